// Argument checks (see checks.h).
#include "checks.h"

#include "kernel_registry.h"

#include <ATen/MemoryOverlap.h>

#include <cmath>
#include <iterator>
#include <string>

namespace masknorm {

void check_given(const char* op, std::initializer_list<std::pair<const char*, at::Tensor>> tensors) {
  for (const auto& [name, t] : tensors) {
    TORCH_CHECK(t.defined(), op, ": expected ", name, " to be a tensor, but got None");
  }
}

void check_input(const at::Tensor& input, const char* op, int64_t min_dim) {
  check_given(op, {{"input", input}});
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
    const std::optional<at::Tensor>& padding_mask, at::IntArrayRef expected_shape, const at::Tensor& input,
    const char* op, const char* shape_rule) {
  if (!padding_mask.has_value() || !padding_mask->defined()) return;
  const at::Tensor& mask = *padding_mask;
  TORCH_CHECK(
      mask.scalar_type() == at::kBool,
      op, ": expected padding_mask to be a bool tensor (True marks padding), but got dtype ", mask.scalar_type());
  TORCH_CHECK(
      mask.device() == input.device(),
      op, ": expected padding_mask on input's device ", input.device(), ", but got ", mask.device());
  TORCH_CHECK(
      mask.sizes() == expected_shape,
      op, ": expected padding_mask of shape ", expected_shape, " (", shape_rule, ", input shape ", input.sizes(),
      "), but got ", mask.sizes());
}

void check_feature_tensor(
    const at::Tensor& t, const char* name, at::IntArrayRef expected_shape, const at::Tensor& like, const char* op) {
  if (!t.defined()) return;
  TORCH_CHECK(
      at::isFloatingType(t.scalar_type()),
      op, ": expected ", name, " to be a floating-point tensor, but got ", t.scalar_type());
  TORCH_CHECK(
      t.device() == like.device(),
      op, ": expected ", name, " on input's device ", like.device(), ", but got ", t.device());
  TORCH_CHECK(
      t.sizes() == expected_shape,
      op, ": expected ", name, " of shape ", expected_shape, " (input shape ", like.sizes(), "), but got ", t.sizes());
}

void check_grad_output(const at::Tensor& grad_output, const at::Tensor& input, const char* op) {
  check_given(op, {{"grad_output", grad_output}});
  TORCH_CHECK(
      grad_output.sizes() == input.sizes(),
      op, ": expected grad_output of input's shape ", input.sizes(), ", but got ", grad_output.sizes());
  TORCH_CHECK(
      grad_output.device() == input.device(),
      op, ": expected grad_output on input's device ", input.device(), ", but got ", grad_output.device());
  TORCH_CHECK(
      at::isFloatingType(grad_output.scalar_type()),
      op, ": expected grad_output to be a floating-point tensor, but got ", grad_output.scalar_type());
}

void check_count(
    const at::Tensor& count, const char* name, at::IntArrayRef expected_shape, const at::Tensor& like, const char* op,
    bool allow_float) {
  const auto dtype = count.scalar_type();
  TORCH_CHECK(
      at::isIntegralType(dtype, /*includeBool=*/false) || (allow_float && at::isFloatingType(dtype)),
      op, ": expected ", name, " to be an integer", allow_float ? " or floating-point" : "", " tensor, but got ",
      dtype);
  TORCH_CHECK(
      count.device() == like.device(),
      op, ": expected ", name, " on input's device ", like.device(), ", but got ", count.device());
  TORCH_CHECK(
      count.sizes() == expected_shape,
      op, ": expected ", name, " of shape ", expected_shape, ", but got ", count.sizes());
}

void check_count_values(const at::Tensor& count, const char* name, const char* op) {
  if (count.numel() == 0 || !data_checks_enabled(count.device())) return;
  // 2^62: far from int64 overflow when the kernels add the counts up.
  constexpr double kMax = 4611686018427387904.0;
  const at::Tensor values = count.to(at::kCPU, at::kDouble).contiguous();
  const double* v = values.const_data_ptr<double>();
  double total = 0;
  for (int64_t i = 0; i < values.numel(); ++i) {
    TORCH_CHECK_VALUE(
        v[i] >= 0 && v[i] <= kMax && std::nearbyint(v[i]) == v[i],
        op, ": expected ", name, " to hold whole numbers of valid positions (0 to 2^62), but got ", v[i],
        count.dim() ? " at index " + std::to_string(i) : std::string());
    total += v[i];
  }
  TORCH_CHECK_VALUE(
      total <= kMax, op, ": expected ", name, " to add up to at most 2^62 valid positions, but got ", total);
}

void check_eps(double eps, const char* op, const char* what, bool positive) {
  TORCH_CHECK_VALUE(
      std::isfinite(eps) && (positive ? eps > 0 : eps >= 0),
      op, ": expected eps to be finite and ", positive ? "> 0" : ">= 0", what[0] ? " " : "", what, ", but got ", eps);
}

namespace {

void check_momentum(std::optional<double> momentum, bool has_num_batches_tracked, const char* op) {
  if (momentum.has_value()) {
    TORCH_CHECK_VALUE(
        *momentum >= 0.0 && *momentum <= 1.0, op, ": expected momentum in [0, 1] or None, but got ", *momentum);
  } else {
    TORCH_CHECK_VALUE(
        has_num_batches_tracked,
        op, ": momentum=None (cumulative moving average) needs num_batches_tracked, but got None");
  }
}

void check_in_place_updates(
    const char* op, std::initializer_list<std::pair<const char*, at::Tensor>> written,
    std::initializer_list<std::pair<const char*, at::Tensor>> read) {
  const auto shares_memory = [](const at::Tensor& a, const at::Tensor& b) {
    const auto status = at::get_overlap_status(a, b);
    return status == at::MemOverlapStatus::Full || status == at::MemOverlapStatus::Partial;
  };
  for (auto w = written.begin(); w != written.end(); ++w) {
    const auto& [name, t] = *w;
    if (!t.defined()) continue;
    TORCH_CHECK(
        at::has_internal_overlap(t) != at::MemOverlap::Yes,
        op, ": expected ", name, " without internal overlap (it is updated in place), but got strides ", t.strides(),
        " for shape ", t.sizes(), " (an expanded tensor?); pass a clone()");
    for (auto other = std::next(w); other != written.end(); ++other) {
      TORCH_CHECK(
          !other->second.defined() || !shares_memory(t, other->second),
          op, ": expected ", name, " and ", other->first, " not to share memory (both are updated in place)");
    }
    for (const auto& [read_name, r] : read) {
      TORCH_CHECK(
          !r.defined() || !shares_memory(t, r),
          op, ": expected ", name, " not to share memory with ", read_name, " (", name,
          " is updated in place while ", read_name, " is read)");
    }
  }
}

}  // namespace

void check_running_stats(
    const char* op, const at::Tensor& running_mean, const at::Tensor& running_var,
    const at::Tensor& num_batches_tracked, const at::Tensor& like) {
  TORCH_CHECK(
      running_mean.defined() == running_var.defined(),
      op, ": expected running_mean and running_var both given or both None, but got only ",
      running_mean.defined() ? "running_mean" : "running_var");
  if (!num_batches_tracked.defined()) return;
  const at::Tensor& nbt = num_batches_tracked;
  TORCH_CHECK(
      nbt.numel() == 1 && nbt.scalar_type() == at::kLong,
      op, ": expected num_batches_tracked to be a one-element int64 tensor, but got dtype ", nbt.scalar_type(),
      " and shape ", nbt.sizes());
  TORCH_CHECK(
      nbt.device() == like.device(),
      op, ": expected num_batches_tracked on input's device ", like.device(), ", but got ", nbt.device());
}

void check_running_stats_update(
    const char* op, const at::Tensor& running_mean, const at::Tensor& running_var,
    const at::Tensor& num_batches_tracked, std::optional<double> momentum,
    std::initializer_list<std::pair<const char*, at::Tensor>> read) {
  if (running_mean.defined()) check_momentum(momentum, num_batches_tracked.defined(), op);
  check_in_place_updates(
      op, {{"running_mean", running_mean}, {"running_var", running_var}, {"num_batches_tracked", num_batches_tracked}},
      read);
}

// ------------------------------------------------------------ layer / RMS norm

void check_row_norm_args(
    const char* op, const at::Tensor& input, at::IntArrayRef normalized_shape,
    const std::optional<at::Tensor>& padding_mask, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias) {
  check_input(input, op, 1);
  const int64_t k = static_cast<int64_t>(normalized_shape.size());
  TORCH_CHECK(k >= 1, op, ": expected normalized_shape to have at least one dimension, but got ", normalized_shape);
  for (const int64_t s : normalized_shape) {
    TORCH_CHECK(s > 0, op, ": expected normalized_shape of positive sizes, but got ", normalized_shape);
  }
  TORCH_CHECK(
      input.dim() >= k && input.sizes().slice(input.dim() - k) == normalized_shape,
      op, ": expected input with trailing dimensions normalized_shape=", normalized_shape, ", but got input of shape ",
      input.sizes());
  check_padding_mask(
      padding_mask, input.sizes().slice(0, input.dim() - k), input, op, "input.shape[:-len(normalized_shape)]");
  check_feature_tensor(weight, "weight", normalized_shape, input, op);
  check_feature_tensor(bias, "bias", normalized_shape, input, op);
}

void check_row_norm_backward_args(
    const char* op, const at::Tensor& grad_output, const at::Tensor& input, at::IntArrayRef normalized_shape,
    const std::optional<at::Tensor>& padding_mask, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& mean, const at::Tensor& rstd) {
  check_row_norm_args(op, input, normalized_shape, padding_mask, weight, std::nullopt);
  check_grad_output(grad_output, input, op);
  check_given(op, {{"rstd", rstd}});
  if (mean.has_value()) check_given(op, {{"mean", *mean}});
  const auto leading = input.sizes().slice(0, input.dim() - normalized_shape.size());
  check_feature_tensor(mean, "mean", leading, input, op);
  check_feature_tensor(rstd, "rstd", leading, input, op);
}

// ------------------------------------------------------------------ batch norm

void check_batch_norm_args(
    const char* op, const at::Tensor& input, const std::optional<at::Tensor>& padding_mask, bool channels_last,
    std::initializer_list<std::pair<const char*, at::Tensor>> per_channel) {
  check_input(input, op, 2);
  TORCH_CHECK(
      input.dim() <= 3,
      op, ": expected 2-D (N, C) or 3-D ", channels_last ? "(N, L, C)" : "(N, C, L)", " input, but got ",
      input.dim(), "-D input of shape ", input.sizes());
  const int64_t N = input.size(0);
  const int64_t C = input.dim() == 3 && channels_last ? input.size(2) : input.size(1);
  if (input.dim() == 2) {
    check_padding_mask(padding_mask, {N}, input, op, "(N,) for 2-D input");
  } else {
    check_padding_mask(padding_mask, {N, input.size(channels_last ? 1 : 2)}, input, op, "(N, L) for 3-D input");
  }
  for (const auto& [name, t] : per_channel) check_feature_tensor(t, name, {C}, input, op);
}

void check_batch_norm_backward_args(
    const char* op, const at::Tensor& grad_output, const at::Tensor& input,
    const std::optional<at::Tensor>& padding_mask, const std::optional<at::Tensor>& weight,
    const at::Tensor& save_mean, const at::Tensor& save_invstd, bool channels_last) {
  check_given(op, {{"grad_output", grad_output}, {"input", input}, {"save_mean", save_mean}, {"save_invstd", save_invstd}});
  check_batch_norm_args(
      op, input, padding_mask, channels_last,
      {{"weight", weight.value_or(at::Tensor())}, {"save_mean", save_mean}, {"save_invstd", save_invstd}});
  check_grad_output(grad_output, input, op);
}

// ------------------------------------------------------ group / instance norm

void check_group_norm_args(
    const char* op, const at::Tensor& input, const std::optional<at::Tensor>& padding_mask, int64_t num_groups,
    bool channels_last, std::initializer_list<std::pair<const char*, at::Tensor>> per_channel) {
  check_batch_norm_args(op, input, padding_mask, channels_last, per_channel);
  const int64_t C = input.dim() == 3 && channels_last ? input.size(2) : input.size(1);
  TORCH_CHECK_VALUE(num_groups > 0, op, ": expected num_groups to be positive, but got ", num_groups);
  TORCH_CHECK_VALUE(
      C % num_groups == 0,
      op, ": expected the number of channels (", C, ", input shape ", input.sizes(),
      ") to be divisible by num_groups, but got num_groups=", num_groups);
}

void check_group_norm_backward_args(
    const char* op, const at::Tensor& grad_output, const at::Tensor& input,
    const std::optional<at::Tensor>& padding_mask, const std::optional<at::Tensor>& weight, const at::Tensor& mean,
    const at::Tensor& rstd, int64_t num_groups, bool channels_last) {
  check_given(op, {{"grad_output", grad_output}, {"input", input}, {"mean", mean}, {"rstd", rstd}});
  check_group_norm_args(op, input, padding_mask, num_groups, channels_last, {{"weight", weight.value_or(at::Tensor())}});
  check_grad_output(grad_output, input, op);
  check_feature_tensor(mean, "mean", {input.size(0), num_groups}, input, op);
  check_feature_tensor(rstd, "rstd", {input.size(0), num_groups}, input, op);
}

void check_instance_norm_args(
    const char* op, const at::Tensor& input, const std::optional<at::Tensor>& padding_mask, bool channels_last) {
  check_batch_norm_args(op, input, padding_mask, channels_last);
  const int64_t L = input.dim() == 3 ? input.size(channels_last ? 1 : 2) : 1;
  const bool masked = padding_mask.has_value() && padding_mask->defined();
  TORCH_CHECK_VALUE(
      masked || L != 1 || input.numel() == 0,
      op, ": expected more than 1 spatial element per sample, but got input of shape ", input.sizes());
  if (!masked || input.numel() == 0 || !data_checks_enabled(input.device())) return;
  const at::Tensor valid = padding_mask->logical_not().reshape({input.size(0), -1}).sum(1);
  TORCH_CHECK_VALUE(
      !valid.eq(1).any().item<bool>(),
      op, ": expected more than 1 valid (non-padding) position per sample, but sample ",
      valid.eq(1).nonzero().view(-1)[0].item<int64_t>(), " has 1");
}

}  // namespace masknorm
