// CPU kernels of masknorm::layer_norm and layer_norm_backward (loops shared
// with RMS norm in row_norm_kernel.h).
#include "../checks.h"
#include "kernels.h"
#include "row_norm_kernel.h"

namespace masknorm::cpu {

using at::Tensor;

std::tuple<Tensor, Tensor, Tensor> layer_norm_forward_cpu(
    const Tensor& input_, at::IntArrayRef normalized_shape, const std::optional<Tensor>& padding_mask,
    const std::optional<Tensor>& weight, const std::optional<Tensor>& bias, double eps) {
  const RowNormShape s = check_row_norm_args(
      "masknorm::layer_norm", input_, normalized_shape, padding_mask, weight, bias);
  const Tensor input = input_.contiguous();
  const Tensor mask = contiguous_mask(padding_mask);
  const auto stat_options = input.options().dtype(opmath_dtype(input));
  Tensor output = at::empty_like(input, at::MemoryFormat::Contiguous);
  Tensor mean = at::empty(s.leading, stat_options);
  Tensor rstd = at::empty(s.leading, stat_options);
  const bool has_w = weight.has_value() && weight->defined();
  const bool has_b = bias.has_value() && bias->defined();
  const Tensor w = has_w ? feature_as_opmath(weight, s.width, input, 1.0) : Tensor();
  const Tensor b = has_b ? feature_as_opmath(bias, s.width, input, 0.0) : Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, input.scalar_type(), "masknorm_layer_norm", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    row_norm_forward<scalar_t>(
        /*centered=*/true, input.const_data_ptr<scalar_t>(),
        mask.defined() ? mask.const_data_ptr<bool>() : nullptr, s.rows, s.width,
        has_w ? w.const_data_ptr<opmath_t>() : nullptr, has_b ? b.const_data_ptr<opmath_t>() : nullptr,
        eps, output.mutable_data_ptr<scalar_t>(), mean.mutable_data_ptr<opmath_t>(),
        rstd.mutable_data_ptr<opmath_t>());
  });
  return {output, mean, rstd};
}

std::tuple<Tensor, Tensor, Tensor> layer_norm_backward_cpu(
    const Tensor& grad_output_, const Tensor& input_, at::IntArrayRef normalized_shape,
    const std::optional<Tensor>& padding_mask, const Tensor& mean_, const Tensor& rstd_,
    const std::optional<Tensor>& weight, std::array<bool, 3> output_mask) {
  constexpr const char* op = "masknorm::layer_norm_backward";
  const RowNormShape s = check_row_norm_backward_args(
      op, grad_output_, input_, normalized_shape, padding_mask, weight, mean_, rstd_);
  const Tensor input = input_.contiguous();
  const Tensor grad_output = grad_output_.to(input.scalar_type()).contiguous();
  const Tensor mask = contiguous_mask(padding_mask);
  const auto stat_options = input.options().dtype(opmath_dtype(input));
  const Tensor mean = mean_.to(stat_options).contiguous();
  const Tensor rstd = rstd_.to(stat_options).contiguous();
  const bool has_w = weight.has_value() && weight->defined();
  const Tensor w = has_w ? feature_as_opmath(weight, s.width, input, 1.0) : Tensor();
  Tensor dx = output_mask[0] ? at::empty_like(input, at::MemoryFormat::Contiguous) : Tensor();
  Tensor dw = output_mask[1] ? at::empty({s.width}, stat_options) : Tensor();
  Tensor db = output_mask[2] ? at::empty({s.width}, stat_options) : Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, input.scalar_type(), "masknorm_layer_norm_backward", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    row_norm_backward<scalar_t>(
        /*centered=*/true, grad_output.const_data_ptr<scalar_t>(), input.const_data_ptr<scalar_t>(),
        mask.defined() ? mask.const_data_ptr<bool>() : nullptr, s.rows, s.width,
        mean.const_data_ptr<opmath_t>(), rstd.const_data_ptr<opmath_t>(),
        has_w ? w.const_data_ptr<opmath_t>() : nullptr,
        dx.defined() ? dx.mutable_data_ptr<scalar_t>() : nullptr,
        dw.defined() ? dw.mutable_data_ptr<opmath_t>() : nullptr,
        db.defined() ? db.mutable_data_ptr<opmath_t>() : nullptr);
  });
  const auto param_dtype = has_w ? weight->scalar_type() : input.scalar_type();
  if (dw.defined()) dw = dw.view(normalized_shape).to(param_dtype);
  if (db.defined()) db = db.view(normalized_shape).to(param_dtype);
  return {dx, dw, db};
}

}  // namespace masknorm::cpu
