// Autograd for masknorm::rms_norm: the forward op's gradient is the
// masknorm::rms_norm_backward op, whose own gradient (double backward) comes
// from differentiable_backward.h. Registered for the Autograd key, so Python
// and C++ callers of the ops get gradients alike.
#include "differentiable_backward.h"
#include "../checks.h"
#include "masknorm/ops.h"

#include <torch/autograd.h>
#include <torch/library.h>

namespace masknorm {
namespace {

using at::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

class RMSNormFunction : public torch::autograd::Function<RMSNormFunction> {
 public:
  static variable_list forward(
      AutogradContext* ctx, const Tensor& input, at::IntArrayRef normalized_shape,
      const std::optional<Tensor>& padding_mask, const std::optional<Tensor>& weight,
      std::optional<double> eps) {
    const Tensor w = weight.value_or(Tensor());
    ctx->saved_data["normalized_shape"] = normalized_shape.vec();
    ctx->saved_data["output_mask"] =
        std::vector<bool>{input.requires_grad(), w.defined() && w.requires_grad()};
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [output, rstd] = rms_norm(input, normalized_shape, padding_mask, weight, eps);
    ctx->save_for_backward({input, padding_mask.value_or(Tensor()), w, rstd});
    ctx->mark_non_differentiable({rstd});
    return {output, rstd};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const auto saved = ctx->get_saved_variables();
    const auto mask = ctx->saved_data["output_mask"].toBoolList();
    const Tensor& grad_output = grad_outputs[0];
    Tensor dx, dw;
    if (grad_output.defined()) {
      std::tie(dx, dw) = rms_norm_backward(
          grad_output, saved[0], ctx->saved_data["normalized_shape"].toIntVector(), saved[1],
          saved[3], saved[2], {mask[0], mask[1]});
    }
    // One entry per forward argument: input, normalized_shape, padding_mask, weight, eps.
    return {dx, Tensor(), Tensor(), dw, Tensor()};
  }
};

std::tuple<Tensor, Tensor> rms_norm_autograd(
    const Tensor& input, at::IntArrayRef normalized_shape, const std::optional<Tensor>& padding_mask,
    const std::optional<Tensor>& weight, std::optional<double> eps) {
  auto out = RMSNormFunction::apply(input, normalized_shape, padding_mask, weight, eps);
  return {out[0], out[1]};
}

std::tuple<Tensor, Tensor> rms_norm_backward_autograd(
    const Tensor& grad_output, const Tensor& input, at::IntArrayRef normalized_shape,
    const std::optional<Tensor>& padding_mask, const Tensor& rstd,
    const std::optional<Tensor>& weight, std::array<bool, 2> output_mask) {
  if (!records_graph({grad_output, input, rstd, weight.value_or(Tensor())})) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return rms_norm_backward(grad_output, input, normalized_shape, padding_mask, rstd, weight, output_mask);
  }
  constexpr const char* op = "masknorm::rms_norm_backward";
  check_row_norm_backward_args(op, grad_output, input, normalized_shape, padding_mask, weight, std::nullopt, rstd);
  auto [dx, dw, db] = differentiable_norm_backward(
      op, row_norm_axes(input, normalized_shape, padding_mask), grad_output, input, weight,
      /*save_mean=*/Tensor(), rstd, /*stats_from_input=*/true, /*centered=*/false,
      {output_mask[0], output_mask[1], false});
  return {dx, dw};
}

}  // namespace

TORCH_LIBRARY_IMPL(masknorm, Autograd, m) {
  m.impl("rms_norm", &rms_norm_autograd);
  m.impl("rms_norm_backward", &rms_norm_backward_autograd);
}

}  // namespace masknorm
