// CPU kernels of masknorm::rms_norm and rms_norm_backward (loops shared with
// layer norm in row_norm_kernel.h).
#include "../checks.h"
#include "kernels.h"
#include "row_norm_kernel.h"

namespace masknorm::cpu {

using at::Tensor;

std::tuple<Tensor, Tensor> rms_norm_forward_cpu(
    const Tensor& input_, at::IntArrayRef normalized_shape, const std::optional<Tensor>& padding_mask,
    const std::optional<Tensor>& weight, std::optional<double> eps) {
  const RowNormShape s = check_row_norm_args(
      "masknorm::rms_norm", input_, normalized_shape, padding_mask, weight, std::nullopt);
  const Tensor input = input_.contiguous();
  const Tensor mask = contiguous_mask(padding_mask);
  const auto stat_options = input.options().dtype(opmath_dtype(input));
  Tensor output = at::empty_like(input, at::MemoryFormat::Contiguous);
  Tensor rstd = at::empty(s.leading, stat_options);
  const bool has_w = weight.has_value() && weight->defined();
  const Tensor w = has_w ? feature_as_opmath(weight, s.width, input, 1.0) : Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, input.scalar_type(), "masknorm_rms_norm", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    // eps=None: the machine epsilon of the accumulation type, as torch.nn.RMSNorm.
    const double eps_value = eps.has_value() ? *eps : double(std::numeric_limits<opmath_t>::epsilon());
    row_norm_forward<scalar_t>(
        /*centered=*/false, input.const_data_ptr<scalar_t>(),
        mask.defined() ? mask.const_data_ptr<bool>() : nullptr, s.rows, s.width,
        has_w ? w.const_data_ptr<opmath_t>() : nullptr, /*b=*/nullptr, eps_value,
        output.mutable_data_ptr<scalar_t>(), /*mean_out=*/nullptr, rstd.mutable_data_ptr<opmath_t>());
  });
  return {output, rstd};
}

std::tuple<Tensor, Tensor> rms_norm_backward_cpu(
    const Tensor& grad_output_, const Tensor& input_, at::IntArrayRef normalized_shape,
    const std::optional<Tensor>& padding_mask, const Tensor& rstd_,
    const std::optional<Tensor>& weight, std::array<bool, 2> output_mask) {
  constexpr const char* op = "masknorm::rms_norm_backward";
  const RowNormShape s = check_row_norm_backward_args(
      op, grad_output_, input_, normalized_shape, padding_mask, weight, std::nullopt, rstd_);
  const Tensor input = input_.contiguous();
  const Tensor grad_output = grad_output_.to(input.scalar_type()).contiguous();
  const Tensor mask = contiguous_mask(padding_mask);
  const auto stat_options = input.options().dtype(opmath_dtype(input));
  const Tensor rstd = rstd_.to(stat_options).contiguous();
  const bool has_w = weight.has_value() && weight->defined();
  const Tensor w = has_w ? feature_as_opmath(weight, s.width, input, 1.0) : Tensor();
  Tensor dx = output_mask[0] ? at::empty_like(input, at::MemoryFormat::Contiguous) : Tensor();
  Tensor dw = output_mask[1] ? at::empty({s.width}, stat_options) : Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, input.scalar_type(), "masknorm_rms_norm_backward", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    row_norm_backward<scalar_t>(
        /*centered=*/false, grad_output.const_data_ptr<scalar_t>(), input.const_data_ptr<scalar_t>(),
        mask.defined() ? mask.const_data_ptr<bool>() : nullptr, s.rows, s.width,
        /*mean=*/nullptr, rstd.const_data_ptr<opmath_t>(),
        has_w ? w.const_data_ptr<opmath_t>() : nullptr,
        dx.defined() ? dx.mutable_data_ptr<scalar_t>() : nullptr,
        dw.defined() ? dw.mutable_data_ptr<opmath_t>() : nullptr, /*db=*/nullptr);
  });
  if (dw.defined()) dw = dw.view(normalized_shape).to(has_w ? weight->scalar_type() : input.scalar_type());
  return {dx, dw};
}

}  // namespace masknorm::cpu
