// Autograd for masknorm::batch_norm: the forward op's gradient is the
// masknorm::batch_norm_backward op, whose own gradient (double backward)
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

class BatchNormFunction : public torch::autograd::Function<BatchNormFunction> {
 public:
  static variable_list forward(
      AutogradContext* ctx, const Tensor& input, const std::optional<Tensor>& padding_mask,
      const std::optional<Tensor>& weight, const std::optional<Tensor>& bias,
      const std::optional<Tensor>& running_mean, const std::optional<Tensor>& running_var,
      bool training, double eps, bool channels_last) {
    const Tensor w = weight.value_or(Tensor());
    const Tensor b = bias.value_or(Tensor());
    ctx->saved_data["training"] = training;
    ctx->saved_data["channels_last"] = channels_last;
    ctx->saved_data["output_mask"] = std::vector<bool>{
        input.requires_grad(), w.defined() && w.requires_grad(), b.defined() && b.requires_grad()};
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [output, save_mean, save_invstd, count] = batch_norm(
        input, padding_mask, weight, bias, running_mean, running_var, training, eps, channels_last);
    ctx->save_for_backward({input, padding_mask.value_or(Tensor()), w, save_mean, save_invstd});
    ctx->mark_non_differentiable({save_mean, save_invstd, count});
    return {output, save_mean, save_invstd, count};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const auto saved = ctx->get_saved_variables();
    const auto mask = ctx->saved_data["output_mask"].toBoolList();
    const Tensor& grad_output = grad_outputs[0];
    Tensor dx, dw, db;
    if (grad_output.defined()) {
      std::tie(dx, dw, db) = batch_norm_backward(
          grad_output, saved[0], saved[1], saved[2], saved[3], saved[4],
          ctx->saved_data["training"].toBool(), ctx->saved_data["channels_last"].toBool(),
          {mask[0], mask[1], mask[2]});
    }
    // One entry per forward argument: input, padding_mask, weight, bias,
    // running_mean, running_var, training, eps, channels_last.
    return {dx, Tensor(), dw, db, Tensor(), Tensor(), Tensor(), Tensor(), Tensor()};
  }
};

std::tuple<Tensor, Tensor, Tensor, Tensor> batch_norm_autograd(
    const Tensor& input, const std::optional<Tensor>& padding_mask,
    const std::optional<Tensor>& weight, const std::optional<Tensor>& bias,
    const std::optional<Tensor>& running_mean, const std::optional<Tensor>& running_var,
    bool training, double eps, bool channels_last) {
  auto out = BatchNormFunction::apply(
      input, padding_mask, weight, bias, running_mean, running_var, training, eps, channels_last);
  return {out[0], out[1], out[2], out[3]};
}

std::tuple<Tensor, Tensor, Tensor> batch_norm_backward_autograd(
    const Tensor& grad_output, const Tensor& input, const std::optional<Tensor>& padding_mask,
    const std::optional<Tensor>& weight, const Tensor& save_mean, const Tensor& save_invstd,
    bool training, bool channels_last, std::array<bool, 3> output_mask) {
  if (!records_graph({grad_output, input, weight.value_or(Tensor()), save_mean, save_invstd})) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return batch_norm_backward(
        grad_output, input, padding_mask, weight, save_mean, save_invstd, training, channels_last,
        output_mask);
  }
  check_batch_norm_backward_args(grad_output, input, padding_mask, weight, save_mean, save_invstd, channels_last);
  // In training the saved statistics are those of input; in eval they are
  // the running statistics, constants of a formula linear in grad_output.
  return differentiable_norm_backward(
      "masknorm::batch_norm_backward", batch_norm_axes(input, padding_mask, channels_last),
      grad_output, input, weight, save_mean, save_invstd, /*stats_from_input=*/training,
      /*centered=*/true, output_mask);
}

}  // namespace

TORCH_LIBRARY_IMPL(masknorm, Autograd, m) {
  m.impl("batch_norm", &batch_norm_autograd);
  m.impl("batch_norm_backward", &batch_norm_backward_autograd);
}

}  // namespace masknorm
