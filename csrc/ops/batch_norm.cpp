// masknorm::batch_norm: schemas and C++ entry points (argument checks: checks.cpp).
// Kernels: cpu/batch_norm_kernel.cpp. Autograd: autograd/batch_norm_autograd.cpp.
#include "masknorm/ops.h"

#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

namespace masknorm {

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
