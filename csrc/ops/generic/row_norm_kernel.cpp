// The layer-norm / RMS-norm kernels (kernels.h) written with ATen ops: any
// device torch supports, and the CPU when forced for testing (see
// batch_norm_kernel.cpp beside this file). The backward is the differentiable
// composite that double backward uses (autograd/differentiable_backward.h),
// so the formula is written once.
// Neighbours: ../row_norm.cpp (the ops), ../cpu/row_norm_kernel.cpp and
// ../cuda/row_norm_kernel.cu (the same kernels as loops).
#include "../autograd/differentiable_backward.h"
#include "../kernels.h"
#include "../tensor_utils.h"

namespace masknorm::generic {

using at::Tensor;

void row_norm_forward(const RowNormForwardArgs& a) {
  const auto opmath = a.rstd.scalar_type();
  const Tensor valid = a.padding_mask.defined() ? a.padding_mask.logical_not().view({a.rows, 1}) : Tensor();
  Tensor x = where_valid(a.input.to(opmath).view({a.rows, a.width}), valid);
  Tensor mean;
  if (a.centered) {
    mean = x.mean(1, /*keepdim=*/true);
    x = x - mean;
  }
  const Tensor rstd = ((x * x).mean(1, /*keepdim=*/true) + a.eps).rsqrt();
  Tensor y = x * rstd;
  if (a.weight.defined()) y = y * a.weight;
  if (a.bias.defined()) y = y + a.bias;
  a.output.view({a.rows, a.width}).copy_(where_valid(y, valid));
  a.rstd.view({a.rows, 1}).copy_(where_valid(rstd, valid));
  if (a.centered) a.mean.view({a.rows, 1}).copy_(where_valid(mean, valid));
}

void row_norm_backward(const RowNormBackwardArgs& a) {
  const Tensor mask = a.padding_mask.defined() ? a.padding_mask.view({a.rows}) : Tensor();
  const Tensor input = a.input.view({a.rows, a.width});
  const std::optional<Tensor> weight = a.weight.defined() ? std::optional<Tensor>(a.weight) : std::nullopt;
  auto [dx, dw, db] = differentiable_norm_backward(
      "masknorm::row_norm_backward", row_norm_axes(input, {a.width}, mask), a.grad_output.view({a.rows, a.width}),
      input, weight, a.centered ? a.mean.view({a.rows}) : Tensor(), a.rstd.view({a.rows}),
      /*stats_from_input=*/true, a.centered,
      {a.grad_input.defined(), a.grad_weight.defined(), a.grad_bias.defined()});
  if (a.grad_input.defined()) a.grad_input.view({a.rows, a.width}).copy_(dx);
  if (a.grad_weight.defined()) a.grad_weight.copy_(dw);
  if (a.grad_bias.defined()) a.grad_bias.copy_(db);
}

}  // namespace masknorm::generic
