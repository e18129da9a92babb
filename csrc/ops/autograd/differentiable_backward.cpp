// The differentiable backward composite (see differentiable_backward.h).
#include "differentiable_backward.h"

#include <ATen/core/grad_mode.h>

namespace masknorm {

using at::Tensor;

bool records_graph(at::ArrayRef<Tensor> tensors) {
  if (!at::GradMode::is_enabled()) return false;
  for (const Tensor& t : tensors) {
    if (t.defined() && t.requires_grad()) return true;
  }
  return false;
}

std::tuple<Tensor, Tensor, Tensor> differentiable_norm_backward(
    const char* op,
    const NormAxes& axes,
    const Tensor& grad_output,
    const Tensor& input,
    const std::optional<Tensor>& weight,
    const Tensor& save_mean,
    const Tensor& save_rstd,
    bool stats_from_input,
    bool centered,
    std::array<bool, 3> output_mask) {
  const auto opmath = opmath_dtype(input);
  const Tensor x = where_valid(input.to(opmath), axes.valid);
  const Tensor dy = where_valid(grad_output.to(opmath), axes.valid);
  const Tensor count = valid_count(axes, input, opmath);
  const Tensor divisor = count.clamp_min(1);
  const auto masked_mean = [&](const Tensor& t) {
    return sum_over(where_valid(t, axes.valid), axes.stat_dims, /*keepdim=*/true) / divisor;
  };

  Tensor rstd, xhat;
  if (stats_from_input) {
    TORCH_CHECK(
        !(save_mean.defined() && save_mean.requires_grad()) && !save_rstd.requires_grad(),
        op, ": derivatives with respect to the saved statistics are not supported: they are taken "
        "to be the statistics of input (as for torch's native batch/layer norm backward), so "
        "differentiate through input instead");
    // Likewise the mean: the saved value (what the kernels read), the
    // derivatives of the input's masked mean.
    Tensor mean;
    if (centered) {
      mean = masked_mean(x);
      if (save_mean.defined()) mean = mean - mean.detach() + save_mean.detach().to(opmath).reshape(axes.stat_view);
    }
    const Tensor centered_x = centered ? x - mean : x;
    const Tensor var = masked_mean(centered_x * centered_x);
    // The value is the saved 1/sqrt(var + eps) (eps is no argument of the
    // backward ops), the derivatives are those of 1/sqrt(var + eps). A group
    // without valid positions (saved 0) takes 1: finite, and selected out.
    const Tensor saved = at::where(count > 0, save_rstd.detach().to(opmath).reshape(axes.stat_view), 1);
    rstd = (var - var.detach() + saved.pow(-2)).rsqrt();
    xhat = centered_x * rstd;
  } else {
    rstd = save_rstd.to(opmath).reshape(axes.stat_view);
    xhat = (x - save_mean.to(opmath).reshape(axes.stat_view)) * rstd;
  }

  const bool has_weight = weight.has_value() && weight->defined();
  Tensor dx, dw, db;
  if (output_mask[0]) {
    const Tensor g = has_weight ? dy * weight->to(opmath).reshape(axes.param_view) : dy;
    Tensor v = g;
    if (stats_from_input) {
      v = v - xhat * masked_mean(g * xhat);
      if (centered) v = v - masked_mean(g);
    }
    dx = where_valid(v * rstd, axes.valid).to(input.scalar_type()).contiguous();
  }
  const auto param_dtype = has_weight ? weight->scalar_type() : input.scalar_type();
  if (output_mask[1]) dw = sum_over(dy * xhat, axes.param_dims, /*keepdim=*/false).to(param_dtype);
  if (output_mask[2]) db = sum_over(dy, axes.param_dims, /*keepdim=*/false).to(param_dtype);
  return {dx, dw, db};
}

}  // namespace masknorm
