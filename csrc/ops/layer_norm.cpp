// masknorm::layer_norm: schemas and C++ entry points.
// Kernels: cpu/layer_norm_kernel.cpp. Autograd: autograd/layer_norm_autograd.cpp.
#include "masknorm/ops.h"

#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

namespace masknorm {

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm(
    const at::Tensor& input,
    at::IntArrayRef normalized_shape,
    const std::optional<at::Tensor>& padding_mask,
    const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias,
    double eps) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("masknorm::layer_norm", "")
                       .typed<decltype(layer_norm)>();
  return op.call(input, normalized_shape, padding_mask, weight, bias, eps);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_backward(
    const at::Tensor& grad_output,
    const at::Tensor& input,
    at::IntArrayRef normalized_shape,
    const std::optional<at::Tensor>& padding_mask,
    const at::Tensor& mean,
    const at::Tensor& rstd,
    const std::optional<at::Tensor>& weight,
    std::array<bool, 3> output_mask) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("masknorm::layer_norm_backward", "")
                       .typed<decltype(layer_norm_backward)>();
  return op.call(grad_output, input, normalized_shape, padding_mask, mean, rstd, weight, output_mask);
}

TORCH_LIBRARY_FRAGMENT(masknorm, m) {
  m.def(
      "layer_norm(Tensor input, int[] normalized_shape, Tensor? padding_mask, Tensor? weight, "
      "Tensor? bias, float eps) -> (Tensor output, Tensor mean, Tensor rstd)");
  m.def(
      "layer_norm_backward(Tensor grad_output, Tensor input, int[] normalized_shape, "
      "Tensor? padding_mask, Tensor mean, Tensor rstd, Tensor? weight, bool[3] output_mask) "
      "-> (Tensor grad_input, Tensor grad_weight, Tensor grad_bias)");
}

}  // namespace masknorm
