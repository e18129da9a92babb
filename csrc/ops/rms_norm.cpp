// masknorm::rms_norm: schemas and C++ entry points.
// Kernels: cpu/rms_norm_kernel.cpp. Autograd: autograd/rms_norm_autograd.cpp.
#include "masknorm/ops.h"

#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

namespace masknorm {

std::tuple<at::Tensor, at::Tensor> rms_norm(
    const at::Tensor& input,
    at::IntArrayRef normalized_shape,
    const std::optional<at::Tensor>& padding_mask,
    const std::optional<at::Tensor>& weight,
    std::optional<double> eps) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("masknorm::rms_norm", "")
                       .typed<decltype(rms_norm)>();
  return op.call(input, normalized_shape, padding_mask, weight, eps);
}

std::tuple<at::Tensor, at::Tensor> rms_norm_backward(
    const at::Tensor& grad_output,
    const at::Tensor& input,
    at::IntArrayRef normalized_shape,
    const std::optional<at::Tensor>& padding_mask,
    const at::Tensor& rstd,
    const std::optional<at::Tensor>& weight,
    std::array<bool, 2> output_mask) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("masknorm::rms_norm_backward", "")
                       .typed<decltype(rms_norm_backward)>();
  return op.call(grad_output, input, normalized_shape, padding_mask, rstd, weight, output_mask);
}

TORCH_LIBRARY_FRAGMENT(masknorm, m) {
  m.def(
      "rms_norm(Tensor input, int[] normalized_shape, Tensor? padding_mask, Tensor? weight, "
      "float? eps) -> (Tensor output, Tensor rstd)");
  m.def(
      "rms_norm_backward(Tensor grad_output, Tensor input, int[] normalized_shape, "
      "Tensor? padding_mask, Tensor rstd, Tensor? weight, bool[2] output_mask) "
      "-> (Tensor grad_input, Tensor grad_weight)");
}

}  // namespace masknorm
