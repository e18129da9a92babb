// masknorm::layer_norm, layer_norm_backward, rms_norm, rms_norm_backward:
// schemas, C++ entry points, and the entry registered for every device
// (checks -> contiguous inputs and allocated outputs -> the device's
// row_norm_forward / row_norm_backward kernel, kernels.h). Layer norm and
// RMS norm share one formula: RMS norm is layer norm with the mean fixed at
// 0 (`centered = false`) and no bias.
// Neighbours: checks.cpp (argument checks), cpu/row_norm_kernel.cpp,
// cuda/row_norm_kernel.cu, generic/row_norm_kernel.cpp (kernels),
// autograd/norm_autograd.cpp (autograd), python/masknorm/_ops.py (fakes).
#include "masknorm/ops.h"

#include "checks.h"
#include "kernels.h"
#include "library.h"
#include "tensor_utils.h"

#include <torch/library.h>

#include <limits>

namespace masknorm {

// ------------------------------------------------------- C++ entry points

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm(
    const at::Tensor& input, at::IntArrayRef normalized_shape, const std::optional<at::Tensor>& padding_mask,
    const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias, double eps) {
  static const auto op = find_op<decltype(layer_norm)>("masknorm::layer_norm");
  return op.call(input, normalized_shape, padding_mask, weight, bias, eps);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_backward(
    const at::Tensor& grad_output, const at::Tensor& input, at::IntArrayRef normalized_shape,
    const std::optional<at::Tensor>& padding_mask, const at::Tensor& mean, const at::Tensor& rstd,
    const std::optional<at::Tensor>& weight, std::array<bool, 3> output_mask) {
  static const auto op = find_op<decltype(layer_norm_backward)>("masknorm::layer_norm_backward");
  return op.call(grad_output, input, normalized_shape, padding_mask, mean, rstd, weight, output_mask);
}

std::tuple<at::Tensor, at::Tensor> rms_norm(
    const at::Tensor& input, at::IntArrayRef normalized_shape, const std::optional<at::Tensor>& padding_mask,
    const std::optional<at::Tensor>& weight, std::optional<double> eps) {
  static const auto op = find_op<decltype(rms_norm)>("masknorm::rms_norm");
  return op.call(input, normalized_shape, padding_mask, weight, eps);
}

std::tuple<at::Tensor, at::Tensor> rms_norm_backward(
    const at::Tensor& grad_output, const at::Tensor& input, at::IntArrayRef normalized_shape,
    const std::optional<at::Tensor>& padding_mask, const at::Tensor& rstd, const std::optional<at::Tensor>& weight,
    std::array<bool, 2> output_mask) {
  static const auto op = find_op<decltype(rms_norm_backward)>("masknorm::rms_norm_backward");
  return op.call(grad_output, input, normalized_shape, padding_mask, rstd, weight, output_mask);
}

TORCH_LIBRARY_FRAGMENT(masknorm, m) {
  m.def(
      "layer_norm(Tensor input, int[] normalized_shape, Tensor? padding_mask, Tensor? weight, Tensor? bias, "
      "float eps) -> (Tensor output, Tensor mean, Tensor rstd)");
  m.def(
      "layer_norm_backward(Tensor grad_output, Tensor input, int[] normalized_shape, Tensor? padding_mask, "
      "Tensor mean, Tensor rstd, Tensor? weight, bool[3] output_mask) "
      "-> (Tensor grad_input, Tensor grad_weight, Tensor grad_bias)");
  m.def(
      "rms_norm(Tensor input, int[] normalized_shape, Tensor? padding_mask, Tensor? weight, float? eps) "
      "-> (Tensor output, Tensor rstd)");
  m.def(
      "rms_norm_backward(Tensor grad_output, Tensor input, int[] normalized_shape, Tensor? padding_mask, "
      "Tensor rstd, Tensor? weight, bool[2] output_mask) -> (Tensor grad_input, Tensor grad_weight)");
}

// ---------------------------------------------------- the ops, any device

namespace {

using at::Tensor;

// Runs the device's forward kernel on checked arguments; mean is undefined
// for RMS norm.
std::tuple<Tensor, Tensor, Tensor> row_norm_forward(
    const Tensor& input, at::IntArrayRef normalized_shape, const std::optional<Tensor>& padding_mask,
    const std::optional<Tensor>& weight, const std::optional<Tensor>& bias, double eps, bool centered) {
  RowNormForwardArgs a;
  a.input = input.contiguous();
  a.padding_mask = contiguous_mask(padding_mask);
  a.width = c10::multiply_integers(normalized_shape);
  a.rows = a.width == 0 ? 0 : input.numel() / a.width;
  a.weight = feature_as_opmath(weight, a.width, input);
  a.bias = feature_as_opmath(bias, a.width, input);
  a.eps = eps;
  a.centered = centered;
  const auto leading = leading_shape(input, normalized_shape);
  const auto stat_options = input.options().dtype(opmath_dtype(input));
  a.output = at::empty_like(a.input, at::MemoryFormat::Contiguous);
  if (centered) a.mean = at::empty(leading, stat_options);
  a.rstd = at::empty(leading, stat_options);
  kernels_for(input.device()).row_norm_forward(a);
  return {a.output, a.mean, a.rstd};
}

// Runs the device's backward kernel on checked arguments. Parameter
// gradients come back in the parameter's dtype, shaped normalized_shape.
std::tuple<Tensor, Tensor, Tensor> row_norm_backward(
    const Tensor& grad_output, const Tensor& input, at::IntArrayRef normalized_shape,
    const std::optional<Tensor>& padding_mask, const Tensor& mean, const Tensor& rstd,
    const std::optional<Tensor>& weight, std::array<bool, 3> output_mask, bool centered) {
  RowNormBackwardArgs a;
  a.input = input.contiguous();
  a.grad_output = grad_output.to(input.scalar_type()).contiguous();
  a.padding_mask = contiguous_mask(padding_mask);
  a.width = c10::multiply_integers(normalized_shape);
  a.rows = a.width == 0 ? 0 : input.numel() / a.width;
  const auto stat_options = input.options().dtype(opmath_dtype(input));
  if (centered) a.mean = mean.to(stat_options).contiguous();
  a.rstd = rstd.to(stat_options).contiguous();
  a.weight = feature_as_opmath(weight, a.width, input);
  a.centered = centered;
  if (output_mask[0]) a.grad_input = at::empty_like(a.input, at::MemoryFormat::Contiguous);
  if (output_mask[1]) a.grad_weight = at::empty({a.width}, stat_options);
  if (output_mask[2]) a.grad_bias = at::empty({a.width}, stat_options);
  kernels_for(input.device()).row_norm_backward(a);
  const auto param_dtype = weight.has_value() && weight->defined() ? weight->scalar_type() : input.scalar_type();
  const auto as_param = [&](const Tensor& g) { return g.defined() ? g.view(normalized_shape).to(param_dtype) : g; };
  return {a.grad_input, as_param(a.grad_weight), as_param(a.grad_bias)};
}

std::tuple<Tensor, Tensor, Tensor> layer_norm_op(
    const Tensor& input, at::IntArrayRef normalized_shape, const std::optional<Tensor>& padding_mask,
    const std::optional<Tensor>& weight, const std::optional<Tensor>& bias, double eps) {
  check_row_norm_args("masknorm::layer_norm", input, normalized_shape, padding_mask, weight, bias);
  check_eps(eps, "masknorm::layer_norm", "", /*positive=*/false);
  return row_norm_forward(input, normalized_shape, padding_mask, weight, bias, eps, /*centered=*/true);
}

std::tuple<Tensor, Tensor, Tensor> layer_norm_backward_op(
    const Tensor& grad_output, const Tensor& input, at::IntArrayRef normalized_shape,
    const std::optional<Tensor>& padding_mask, const Tensor& mean, const Tensor& rstd,
    const std::optional<Tensor>& weight, std::array<bool, 3> output_mask) {
  check_row_norm_backward_args(
      "masknorm::layer_norm_backward", grad_output, input, normalized_shape, padding_mask, weight, mean, rstd);
  return row_norm_backward(
      grad_output, input, normalized_shape, padding_mask, mean, rstd, weight, output_mask, /*centered=*/true);
}

std::tuple<Tensor, Tensor> rms_norm_op(
    const Tensor& input, at::IntArrayRef normalized_shape, const std::optional<Tensor>& padding_mask,
    const std::optional<Tensor>& weight, std::optional<double> eps) {
  check_row_norm_args("masknorm::rms_norm", input, normalized_shape, padding_mask, weight, std::nullopt);
  if (eps.has_value()) check_eps(*eps, "masknorm::rms_norm", "", /*positive=*/false);
  // eps=None: the machine epsilon of the accumulation type, as torch.nn.RMSNorm.
  const double eps_value = eps.has_value() ? *eps
      : opmath_dtype(input) == at::kDouble ? std::numeric_limits<double>::epsilon()
                                           : double(std::numeric_limits<float>::epsilon());
  auto [output, mean, rstd] =
      row_norm_forward(input, normalized_shape, padding_mask, weight, std::nullopt, eps_value, /*centered=*/false);
  return {output, rstd};
}

std::tuple<Tensor, Tensor> rms_norm_backward_op(
    const Tensor& grad_output, const Tensor& input, at::IntArrayRef normalized_shape,
    const std::optional<Tensor>& padding_mask, const Tensor& rstd, const std::optional<Tensor>& weight,
    std::array<bool, 2> output_mask) {
  check_row_norm_backward_args(
      "masknorm::rms_norm_backward", grad_output, input, normalized_shape, padding_mask, weight, std::nullopt, rstd);
  auto [dx, dw, db] = row_norm_backward(
      grad_output, input, normalized_shape, padding_mask, Tensor(), rstd, weight,
      {output_mask[0], output_mask[1], false}, /*centered=*/false);
  return {dx, dw};
}

}  // namespace

TORCH_LIBRARY_IMPL(masknorm, CompositeExplicitAutograd, m) {
  m.impl("layer_norm", &layer_norm_op);
  m.impl("layer_norm_backward", &layer_norm_backward_op);
  m.impl("rms_norm", &rms_norm_op);
  m.impl("rms_norm_backward", &rms_norm_backward_op);
}

}  // namespace masknorm
