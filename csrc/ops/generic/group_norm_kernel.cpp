// The group-norm kernels (kernels.h) written with ATen ops: any device torch
// supports (CUDA tensors too, see ../cuda/group_norm_kernel.cu), and the CPU
// when forced for testing. The input is viewed with its groups as a
// dimension of their own (tensor_utils.h: group_norm_view), so statistics are
// plain reductions; the backward is the differentiable composite that double
// backward uses (autograd/differentiable_backward.h).
// Neighbours: ../group_norm.cpp (the ops), ../cpu/group_norm_kernel.cpp (the
// same kernels as loops).
#include "../autograd/differentiable_backward.h"
#include "../kernels.h"
#include "../tensor_utils.h"

namespace masknorm::generic {

using at::Tensor;

void group_norm_forward(const GroupNormForwardArgs& a) {
  const auto opmath = a.mean.scalar_type();
  const auto view = group_norm_view(a.layout, a.groups);
  const NormAxes axes = group_norm_axes(a.layout, a.groups, a.padding_mask);
  const Tensor x = where_valid(a.input.to(opmath).view(view), axes.valid);
  const Tensor count = valid_count(axes, x, opmath);
  const Tensor n = count.clamp_min(1);
  // Corrected two passes, as batch norm's (generic/batch_norm_kernel.cpp).
  const Tensor first = sum_over(x, axes.stat_dims, /*keepdim=*/true) / n;
  const Tensor d = where_valid(x - first, axes.valid);
  const Tensor ds = sum_over(d, axes.stat_dims, /*keepdim=*/true);
  const Tensor mean = first + ds / n;
  const Tensor m2 = (sum_over(d * d, axes.stat_dims, /*keepdim=*/true) - ds * ds / n).clamp_min(0);
  const Tensor rstd = at::where(count > 0, (m2 / n + a.eps).rsqrt(), 0);
  Tensor y = (x - mean) * rstd;
  if (a.weight.defined()) y = y * a.weight.view(axes.param_view);
  if (a.bias.defined()) y = y + a.bias.view(axes.param_view);
  a.output.view(view).copy_(where_valid(y, axes.valid));
  a.mean.copy_(mean.reshape({a.layout.N, a.groups}));
  a.rstd.copy_(rstd.reshape({a.layout.N, a.groups}));
  if (!a.running_mean.defined()) return;
  // The average over samples with at least 2 valid values of their mean and
  // unbiased variance; no update where no sample has 2.
  const Tensor counts = count.expand(axes.stat_view).reshape({a.layout.N, a.groups});
  const Tensor use = counts >= 2;
  const Tensor samples = use.sum(0);
  const Tensor taken = samples.to(opmath).clamp_min(1);
  const Tensor batch_mean = at::where(use, mean.reshape({a.layout.N, a.groups}), 0).sum(0) / taken;
  const Tensor unbiased = m2.reshape({a.layout.N, a.groups}) / (counts - 1).clamp_min(1);
  const Tensor batch_var = at::where(use, unbiased, 0).sum(0) / taken;
  const auto moved = [&](const Tensor& running, const Tensor& batch) {
    return at::where(samples > 0, running * (1 - a.momentum) + batch * a.momentum, running);
  };
  a.running_mean.copy_(moved(a.running_mean, batch_mean));
  a.running_var.copy_(moved(a.running_var, batch_var));
}

void group_norm_backward(const GroupNormBackwardArgs& a) {
  const auto view = group_norm_view(a.layout, a.groups);
  const NormAxes axes = group_norm_axes(a.layout, a.groups, a.padding_mask);
  const std::optional<Tensor> weight = a.weight.defined() ? std::optional<Tensor>(a.weight) : std::nullopt;
  auto [dx, dw, db] = differentiable_norm_backward(
      "masknorm::group_norm_backward", axes, a.grad_output.view(view), a.input.view(view), weight, a.mean,
      a.rstd, /*stats_from_input=*/true, /*centered=*/true,
      {a.grad_input.defined(), a.grad_weight.defined(), a.grad_bias.defined()});
  if (a.grad_input.defined()) a.grad_input.view(view).copy_(dx);
  if (a.grad_weight.defined()) a.grad_weight.copy_(dw.reshape({-1}));
  if (a.grad_bias.defined()) a.grad_bias.copy_(db.reshape({-1}));
}

}  // namespace masknorm::generic
