// Autograd for masknorm::layer_norm: the forward op's gradient is the
// masknorm::layer_norm_backward op, whose own gradient (double backward)
// comes from differentiable_backward.h. Registered for the Autograd key, so
// Python and C++ callers of the ops get gradients alike.
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

class LayerNormFunction : public torch::autograd::Function<LayerNormFunction> {
 public:
  static variable_list forward(
      AutogradContext* ctx, const Tensor& input, at::IntArrayRef normalized_shape,
      const std::optional<Tensor>& padding_mask, const std::optional<Tensor>& weight,
      const std::optional<Tensor>& bias, double eps) {
    const Tensor w = weight.value_or(Tensor());
    const Tensor b = bias.value_or(Tensor());
    ctx->saved_data["normalized_shape"] = normalized_shape.vec();
    ctx->saved_data["output_mask"] = std::vector<bool>{
        input.requires_grad(), w.defined() && w.requires_grad(), b.defined() && b.requires_grad()};
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [output, mean, rstd] = layer_norm(input, normalized_shape, padding_mask, weight, bias, eps);
    ctx->save_for_backward({input, padding_mask.value_or(Tensor()), w, mean, rstd});
    ctx->mark_non_differentiable({mean, rstd});
    return {output, mean, rstd};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const auto saved = ctx->get_saved_variables();
    const auto mask = ctx->saved_data["output_mask"].toBoolList();
    const Tensor& grad_output = grad_outputs[0];
    Tensor dx, dw, db;
    if (grad_output.defined()) {
      std::tie(dx, dw, db) = layer_norm_backward(
          grad_output, saved[0], ctx->saved_data["normalized_shape"].toIntVector(), saved[1],
          saved[3], saved[4], saved[2], {mask[0], mask[1], mask[2]});
    }
    // One entry per forward argument: input, normalized_shape, padding_mask, weight, bias, eps.
    return {dx, Tensor(), Tensor(), dw, db, Tensor()};
  }
};

std::tuple<Tensor, Tensor, Tensor> layer_norm_autograd(
    const Tensor& input, at::IntArrayRef normalized_shape, const std::optional<Tensor>& padding_mask,
    const std::optional<Tensor>& weight, const std::optional<Tensor>& bias, double eps) {
  auto out = LayerNormFunction::apply(input, normalized_shape, padding_mask, weight, bias, eps);
  return {out[0], out[1], out[2]};
}

std::tuple<Tensor, Tensor, Tensor> layer_norm_backward_autograd(
    const Tensor& grad_output, const Tensor& input, at::IntArrayRef normalized_shape,
    const std::optional<Tensor>& padding_mask, const Tensor& mean, const Tensor& rstd,
    const std::optional<Tensor>& weight, std::array<bool, 3> output_mask) {
  if (!records_graph({grad_output, input, mean, rstd, weight.value_or(Tensor())})) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return layer_norm_backward(
        grad_output, input, normalized_shape, padding_mask, mean, rstd, weight, output_mask);
  }
  constexpr const char* op = "masknorm::layer_norm_backward";
  check_row_norm_backward_args(op, grad_output, input, normalized_shape, padding_mask, weight, mean, rstd);
  return differentiable_norm_backward(
      op, row_norm_axes(input, normalized_shape, padding_mask), grad_output, input, weight, mean,
      rstd, /*stats_from_input=*/true, /*centered=*/true, output_mask);
}

}  // namespace

TORCH_LIBRARY_IMPL(masknorm, Autograd, m) {
  m.impl("layer_norm", &layer_norm_autograd);
  m.impl("layer_norm_backward", &layer_norm_backward_autograd);
}

}  // namespace masknorm
