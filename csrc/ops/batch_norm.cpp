// masknorm::batch_norm: schemas, C++ entry points and argument checks.
// Kernels: cpu/batch_norm_kernel.cpp. Autograd: autograd/batch_norm_autograd.cpp.
#include "batch_norm.h"

#include "checks.h"
#include "masknorm/ops.h"

#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

namespace masknorm {

BatchNormLayout check_batch_norm_args(
    const char* op,
    const at::Tensor& input,
    const std::optional<at::Tensor>& padding_mask,
    const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& running_mean,
    const std::optional<at::Tensor>& running_var,
    bool channels_last) {
  check_input(input, op, 2);
  TORCH_CHECK(
      input.dim() <= 3,
      op, ": expected 2-D (N, C) or 3-D ", channels_last ? "(N, L, C)" : "(N, C, L)",
      " input, but got ", input.dim(), "-D input of shape ", input.sizes());
  BatchNormLayout g;
  g.N = input.size(0);
  if (input.dim() == 2) {
    g.C = input.size(1);
  } else if (channels_last) {
    g.L = input.size(1);
    g.C = input.size(2);
  } else {
    g.C = input.size(1);
    g.L = input.size(2);
    g.channels_inner = false;
  }
  if (input.dim() == 2) {
    check_padding_mask(padding_mask, {g.N}, input, op, "(N,) for 2-D input");
  } else {
    check_padding_mask(padding_mask, {g.N, g.L}, input, op, "(N, L) for 3-D input");
  }
  check_feature_tensor(weight, "weight", {g.C}, input, op);
  check_feature_tensor(bias, "bias", {g.C}, input, op);
  check_feature_tensor(running_mean, "running_mean", {g.C}, input, op);
  check_feature_tensor(running_var, "running_var", {g.C}, input, op);
  return g;
}

void check_running_stats_update_args(
    const at::Tensor& running_mean,
    const at::Tensor& running_var,
    const at::Tensor& save_mean,
    const at::Tensor& save_invstd,
    const at::Tensor& count,
    std::optional<double> momentum,
    const std::optional<at::Tensor>& num_batches_tracked) {
  constexpr const char* op = "masknorm::batch_norm_update_running_stats";
  TORCH_CHECK(
      save_mean.dim() == 1,
      op, ": expected save_mean of shape (C,), but got ", save_mean.sizes());
  const int64_t C = save_mean.size(0);
  check_feature_tensor(running_mean, "running_mean", {C}, save_mean, op);
  check_feature_tensor(running_var, "running_var", {C}, save_mean, op);
  check_feature_tensor(save_invstd, "save_invstd", {C}, save_mean, op);
  TORCH_CHECK(
      count.numel() == 1 && !at::isFloatingType(count.scalar_type()),
      op, ": expected count to be a one-element integer tensor, but got dtype ", count.scalar_type(),
      " and shape ", count.sizes());
  if (momentum.has_value()) {
    TORCH_CHECK(
        *momentum >= 0.0 && *momentum <= 1.0,
        op, ": expected momentum in [0, 1] or None, but got ", *momentum);
  } else {
    TORCH_CHECK(
        num_batches_tracked.has_value() && num_batches_tracked->defined() &&
            num_batches_tracked->numel() == 1,
        op, ": momentum=None (cumulative moving average) needs num_batches_tracked, a one-element "
        "tensor, but got ", num_batches_tracked.has_value() && num_batches_tracked->defined()
            ? num_batches_tracked->sizes() : at::IntArrayRef{});
  }
}

// ------------------------------------------------------- C++ entry points
// They call through the dispatcher, so autograd, tracing and every backend
// apply to C++ callers as they do to torch.ops.masknorm in Python.

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> batch_norm(
    const at::Tensor& input,
    const std::optional<at::Tensor>& padding_mask,
    const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& running_mean,
    const std::optional<at::Tensor>& running_var,
    bool training,
    double eps,
    bool channels_last) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("masknorm::batch_norm", "")
                       .typed<decltype(batch_norm)>();
  return op.call(input, padding_mask, weight, bias, running_mean, running_var, training, eps, channels_last);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_backward(
    const at::Tensor& grad_output,
    const at::Tensor& input,
    const std::optional<at::Tensor>& padding_mask,
    const std::optional<at::Tensor>& weight,
    const at::Tensor& save_mean,
    const at::Tensor& save_invstd,
    bool training,
    bool channels_last,
    std::array<bool, 3> output_mask) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("masknorm::batch_norm_backward", "")
                       .typed<decltype(batch_norm_backward)>();
  return op.call(grad_output, input, padding_mask, weight, save_mean, save_invstd, training, channels_last, output_mask);
}

void batch_norm_update_running_stats(
    at::Tensor& running_mean,
    at::Tensor& running_var,
    const at::Tensor& save_mean,
    const at::Tensor& save_invstd,
    const at::Tensor& count,
    double eps,
    std::optional<double> momentum,
    const std::optional<at::Tensor>& num_batches_tracked) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("masknorm::batch_norm_update_running_stats", "")
                       .typed<decltype(batch_norm_update_running_stats)>();
  op.call(running_mean, running_var, save_mean, save_invstd, count, eps, momentum, num_batches_tracked);
}

TORCH_LIBRARY_FRAGMENT(masknorm, m) {
  m.def(
      "batch_norm(Tensor input, Tensor? padding_mask, Tensor? weight, Tensor? bias, "
      "Tensor? running_mean, Tensor? running_var, bool training, float eps, bool channels_last) "
      "-> (Tensor output, Tensor save_mean, Tensor save_invstd, Tensor count)");
  m.def(
      "batch_norm_backward(Tensor grad_output, Tensor input, Tensor? padding_mask, Tensor? weight, "
      "Tensor save_mean, Tensor save_invstd, bool training, bool channels_last, bool[3] output_mask) "
      "-> (Tensor grad_input, Tensor grad_weight, Tensor grad_bias)");
  m.def(
      "batch_norm_update_running_stats(Tensor(a!) running_mean, Tensor(b!) running_var, "
      "Tensor save_mean, Tensor save_invstd, Tensor count, float eps, float? momentum, "
      "Tensor? num_batches_tracked) -> ()");
}

}  // namespace masknorm
