#include "checks.h"

#include <ATen/OpMathType.h>

namespace masknorm {

void check_input(const at::Tensor& input, const char* op, int64_t min_dim) {
  TORCH_CHECK(
      at::isFloatingType(input.scalar_type()),
      op, ": expected input to be a floating-point tensor (float32, float64, bfloat16 or float16), but got ",
      input.scalar_type());
  TORCH_CHECK(
      input.dim() >= min_dim,
      op, ": expected input to have at least ", min_dim, " dimensions, but got ", input.dim(),
      " (shape ", input.sizes(), ")");
}

void check_padding_mask(
    const std::optional<at::Tensor>& padding_mask,
    at::IntArrayRef expected_shape,
    const at::Tensor& input,
    const char* op,
    const char* shape_rule) {
  if (!padding_mask.has_value() || !padding_mask->defined()) return;
  const at::Tensor& mask = *padding_mask;
  TORCH_CHECK(
      mask.scalar_type() == at::kBool,
      op, ": expected padding_mask to be a bool tensor (True marks padding), but got dtype ",
      mask.scalar_type());
  TORCH_CHECK(
      mask.device() == input.device(),
      op, ": expected padding_mask on input's device ", input.device(), ", but got ", mask.device());
  TORCH_CHECK(
      mask.sizes() == expected_shape,
      op, ": expected padding_mask of shape ", expected_shape, " (", shape_rule, ", input shape ",
      input.sizes(), "), but got ", mask.sizes());
}

void check_feature_tensor(
    const std::optional<at::Tensor>& t,
    const char* name,
    at::IntArrayRef expected_shape,
    const at::Tensor& input,
    const char* op) {
  if (!t.has_value() || !t->defined()) return;
  TORCH_CHECK(
      at::isFloatingType(t->scalar_type()),
      op, ": expected ", name, " to be a floating-point tensor, but got ", t->scalar_type());
  TORCH_CHECK(
      t->device() == input.device(),
      op, ": expected ", name, " on input's device ", input.device(), ", but got ", t->device());
  TORCH_CHECK(
      t->sizes() == expected_shape,
      op, ": expected ", name, " of shape ", expected_shape, " (input shape ", input.sizes(),
      "), but got ", t->sizes());
}

void check_grad_output(const at::Tensor& grad_output, const at::Tensor& input, const char* op) {
  TORCH_CHECK(
      grad_output.sizes() == input.sizes(),
      op, ": expected grad_output of input's shape ", input.sizes(), ", but got ", grad_output.sizes());
  TORCH_CHECK(
      grad_output.device() == input.device(),
      op, ": expected grad_output on input's device ", input.device(), ", but got ",
      grad_output.device());
  TORCH_CHECK(
      at::isFloatingType(grad_output.scalar_type()),
      op, ": expected grad_output to be a floating-point tensor, but got ", grad_output.scalar_type());
}

void check_normalized_shape(at::IntArrayRef normalized_shape, const at::Tensor& input, const char* op) {
  const int64_t k = static_cast<int64_t>(normalized_shape.size());
  TORCH_CHECK(k >= 1, op, ": expected normalized_shape to have at least one dimension, but got ", normalized_shape);
  for (const int64_t s : normalized_shape) {
    TORCH_CHECK(s > 0, op, ": expected normalized_shape of positive sizes, but got ", normalized_shape);
  }
  TORCH_CHECK(
      input.dim() >= k && input.sizes().slice(input.dim() - k) == normalized_shape,
      op, ": expected input with trailing dimensions normalized_shape=", normalized_shape,
      ", but got input of shape ", input.sizes());
}

std::vector<int64_t> leading_shape(const at::Tensor& input, at::IntArrayRef normalized_shape) {
  const auto sizes = input.sizes();
  return std::vector<int64_t>(sizes.begin(), sizes.end() - normalized_shape.size());
}

at::Tensor contiguous_mask(const std::optional<at::Tensor>& padding_mask) {
  if (!padding_mask.has_value() || !padding_mask->defined()) return at::Tensor();
  return padding_mask->contiguous();
}

at::ScalarType opmath_dtype(const at::Tensor& input) {
  return input.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

at::Tensor feature_as_opmath(
    const std::optional<at::Tensor>& t, int64_t size, const at::Tensor& input, double fill) {
  const auto options = input.options().dtype(opmath_dtype(input));
  if (!t.has_value() || !t->defined()) return at::full({size}, fill, options);
  return t->reshape({size}).to(options).contiguous();
}

}  // namespace masknorm

namespace masknorm {

RowNormShape check_row_norm_args(
    const char* op,
    const at::Tensor& input,
    at::IntArrayRef normalized_shape,
    const std::optional<at::Tensor>& padding_mask,
    const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias) {
  check_input(input, op, 1);
  check_normalized_shape(normalized_shape, input, op);
  RowNormShape s;
  s.leading = leading_shape(input, normalized_shape);
  s.width = c10::multiply_integers(normalized_shape);
  s.rows = c10::multiply_integers(s.leading);
  check_padding_mask(padding_mask, s.leading, input, op, "input.shape[:-len(normalized_shape)]");
  check_feature_tensor(weight, "weight", normalized_shape, input, op);
  check_feature_tensor(bias, "bias", normalized_shape, input, op);
  return s;
}

// ------------------------------------------------------------ batch norm

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

BatchNormLayout check_batch_norm_backward_args(
    const at::Tensor& grad_output,
    const at::Tensor& input,
    const std::optional<at::Tensor>& padding_mask,
    const std::optional<at::Tensor>& weight,
    const at::Tensor& save_mean,
    const at::Tensor& save_invstd,
    bool channels_last) {
  constexpr const char* op = "masknorm::batch_norm_backward";
  const BatchNormLayout g = check_batch_norm_args(
      op, input, padding_mask, weight, std::nullopt, std::nullopt, std::nullopt, channels_last);
  check_grad_output(grad_output, input, op);
  check_feature_tensor(save_mean, "save_mean", {g.C}, input, op);
  check_feature_tensor(save_invstd, "save_invstd", {g.C}, input, op);
  return g;
}

RowNormShape check_row_norm_backward_args(
    const char* op,
    const at::Tensor& grad_output,
    const at::Tensor& input,
    at::IntArrayRef normalized_shape,
    const std::optional<at::Tensor>& padding_mask,
    const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& mean,
    const at::Tensor& rstd) {
  const RowNormShape s = check_row_norm_args(op, input, normalized_shape, padding_mask, weight, std::nullopt);
  check_grad_output(grad_output, input, op);
  check_feature_tensor(mean, "mean", s.leading, input, op);
  check_feature_tensor(rstd, "rstd", s.leading, input, op);
  return s;
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

}  // namespace masknorm
