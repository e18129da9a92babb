#include "differentiable_backward.h"

#include "../checks.h"

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

namespace {

// at::sum over an empty list of dims would reduce every dim.
Tensor sum_over(const Tensor& t, at::IntArrayRef dims, bool keepdim) {
  return dims.empty() ? t : t.sum(dims, keepdim);
}

// t at valid positions, 0 at padding (selected, so NaN/inf there cannot leak,
// and the derivative of the result is 0 at padding).
Tensor where_valid(const Tensor& t, const Tensor& valid) {
  return valid.defined() ? at::where(valid, t, 0) : t;
}

// Number of valid positions in each statistic's group (keepdim shape).
Tensor valid_count(const NormAxes& axes, const Tensor& input, at::ScalarType dtype) {
  if (axes.valid.defined()) {
    return axes.valid.expand(input.sizes()).sum(axes.stat_dims, /*keepdim=*/true, dtype);
  }
  double n = 1;
  for (const int64_t d : axes.stat_dims) n *= static_cast<double>(input.size(d));
  return at::scalar_tensor(n, input.options().dtype(dtype));
}

}  // namespace

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
    const Tensor centered_x = centered ? x - masked_mean(x) : x;
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

NormAxes batch_norm_axes(const Tensor& input, const std::optional<Tensor>& padding_mask, bool channels_last) {
  NormAxes axes;
  std::vector<int64_t> mask_view;
  const int64_t N = input.size(0);
  if (input.dim() == 2) {
    axes.stat_dims = {0};
    axes.param_view = {1, input.size(1)};
    mask_view = {N, 1};
  } else if (channels_last) {
    axes.stat_dims = {0, 1};
    axes.param_view = {1, 1, input.size(2)};
    mask_view = {N, input.size(1), 1};
  } else {
    axes.stat_dims = {0, 2};
    axes.param_view = {1, input.size(1), 1};
    mask_view = {N, 1, input.size(2)};
  }
  axes.param_dims = axes.stat_dims;
  axes.stat_view = axes.param_view;
  if (padding_mask.has_value() && padding_mask->defined()) {
    axes.valid = padding_mask->logical_not().reshape(mask_view);
  }
  return axes;
}

NormAxes row_norm_axes(
    const Tensor& input, at::IntArrayRef normalized_shape, const std::optional<Tensor>& padding_mask) {
  NormAxes axes;
  const int64_t lead = input.dim() - static_cast<int64_t>(normalized_shape.size());
  axes.stat_view = leading_shape(input, normalized_shape);
  for (int64_t d = 0; d < input.dim(); ++d) {
    if (d < lead) {
      axes.param_dims.push_back(d);
    } else {
      axes.stat_dims.push_back(d);
      axes.stat_view.push_back(1);
    }
  }
  axes.param_view = normalized_shape.vec();
  if (padding_mask.has_value() && padding_mask->defined()) {
    axes.valid = padding_mask->logical_not().reshape(axes.stat_view);
  }
  return axes;
}

}  // namespace masknorm
