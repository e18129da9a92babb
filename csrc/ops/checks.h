// Argument checks of the masknorm ops, run once per call by each op's entry
// (batch_norm.cpp, row_norm.cpp) before any kernel: bad input raises an
// error naming the op, the argument, what was expected and what came.
// The fake kernels (python/masknorm/_ops.py) mirror them for traced shapes.
#pragma once

#include <ATen/ATen.h>

#include <optional>

namespace masknorm {

// Tensors the schema requires (`Tensor`, not `Tensor?`) are given: Python's
// op binding passes None for them as an undefined tensor, which the ops
// would otherwise meet deep inside (an error naming no argument).
void check_given(const char* op, std::initializer_list<std::pair<const char*, at::Tensor>> tensors);

// input: a floating-point tensor with at least `min_dim` dimensions.
void check_input(const at::Tensor& input, const char* op, int64_t min_dim);

// padding_mask: bool, on input's device, of shape `expected_shape`.
void check_padding_mask(
    const std::optional<at::Tensor>& padding_mask, at::IntArrayRef expected_shape, const at::Tensor& input,
    const char* op, const char* shape_rule);

// A per-feature tensor (weight, bias, running or saved statistics): floating
// point, on `like`'s device, of shape `expected_shape`. Absent is fine.
void check_feature_tensor(
    const at::Tensor& t, const char* name, at::IntArrayRef expected_shape, const at::Tensor& like, const char* op);
inline void check_feature_tensor(
    const std::optional<at::Tensor>& t, const char* name, at::IntArrayRef expected_shape, const at::Tensor& like,
    const char* op) {
  if (t.has_value()) check_feature_tensor(*t, name, expected_shape, like, op);
}

// grad_output: floating point, of input's shape and device.
void check_grad_output(const at::Tensor& grad_output, const at::Tensor& input, const char* op);

// A count: an integer tensor of `expected_shape` on `like`'s device
// (`allow_float`: a floating-point tensor holding counts, as gathered with
// float statistics).
void check_count(
    const at::Tensor& count, const char* name, at::IntArrayRef expected_shape, const at::Tensor& like, const char* op,
    bool allow_float);

// The values of a count (check_count has checked the tensor), where
// data-dependent checks run (kernel_registry.h: always for CPU tensors):
// whole numbers >= 0 whose total is at most 2^62. A negative, fractional,
// NaN or overflowing count would otherwise be rounded or wrapped into a
// silently wrong result.
void check_count_values(const at::Tensor& count, const char* name, const char* op);

// eps: finite and > 0 where a batch's own variance is normalized
// (`positive`: batch norm in training, merge_stats), finite and >= 0
// elsewhere (batch norm in eval, layer and RMS norm): NaN, inf and negative
// values raise a ValueError naming eps instead of giving NaN or 0 outputs.
// `what` says when the rule applies ("when training"), or is "".
void check_eps(double eps, const char* op, const char* what, bool positive = true);

// Running statistics as batch_norm and batch_norm_merge_stats take them
// (undefined = None): running_mean and running_var given together, and
// num_batches_tracked, when given (whatever the mode: a tensor on another
// device would send the call elsewhere), a one-element int64 tensor on
// `like`'s device. Their shapes are checked with the op's feature tensors.
void check_running_stats(
    const char* op, const at::Tensor& running_mean, const at::Tensor& running_var,
    const at::Tensor& num_batches_tracked, const at::Tensor& like);

// Before the running statistics are updated in place: momentum in [0, 1], or
// None with num_batches_tracked to take the cumulative average (when they are
// given); and the updated tensors overlap neither themselves (an expanded
// tensor would write several elements to one place), nor each other, nor a
// tensor the op reads (`read`), which the update would change under it.
void check_running_stats_update(
    const char* op, const at::Tensor& running_mean, const at::Tensor& running_var,
    const at::Tensor& num_batches_tracked, std::optional<double> momentum,
    std::initializer_list<std::pair<const char*, at::Tensor>> read);

// ------------------------------------------------------------ layer / RMS norm

// input, normalized_shape (non-empty, positive, input's trailing dims),
// padding_mask (input.shape[:-len(normalized_shape)]), weight and bias
// (normalized_shape).
void check_row_norm_args(
    const char* op, const at::Tensor& input, at::IntArrayRef normalized_shape,
    const std::optional<at::Tensor>& padding_mask, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias);

// The forward checks plus grad_output and the saved per-row statistics.
void check_row_norm_backward_args(
    const char* op, const at::Tensor& grad_output, const at::Tensor& input, at::IntArrayRef normalized_shape,
    const std::optional<at::Tensor>& padding_mask, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& mean, const at::Tensor& rstd);

// ------------------------------------------------------------------ batch norm

// input (2-D (N, C), or 3-D (N, C, L) / (N, L, C) with channels_last),
// padding_mask ((N,) or (N, L)) and per-channel tensors (C,), any of which
// be absent (undefined).
void check_batch_norm_args(
    const char* op, const at::Tensor& input, const std::optional<at::Tensor>& padding_mask, bool channels_last,
    std::initializer_list<std::pair<const char*, at::Tensor>> per_channel = {});

// batch_norm_backward's arguments: the forward checks with the saved
// statistics as per-channel tensors, and grad_output.
void check_batch_norm_backward_args(
    const char* op, const at::Tensor& grad_output, const at::Tensor& input,
    const std::optional<at::Tensor>& padding_mask, const std::optional<at::Tensor>& weight,
    const at::Tensor& save_mean, const at::Tensor& save_invstd, bool channels_last);

// ------------------------------------------------------ group / instance norm

// check_batch_norm_args (the layouts and the per-channel tensors), and
// num_groups: positive, dividing the channel count.
void check_group_norm_args(
    const char* op, const at::Tensor& input, const std::optional<at::Tensor>& padding_mask, int64_t num_groups,
    bool channels_last, std::initializer_list<std::pair<const char*, at::Tensor>> per_channel = {});

// The forward checks, grad_output, and the saved (N, num_groups) statistics.
void check_group_norm_backward_args(
    const char* op, const at::Tensor& grad_output, const at::Tensor& input,
    const std::optional<at::Tensor>& padding_mask, const std::optional<at::Tensor>& weight, const at::Tensor& mean,
    const at::Tensor& rstd, int64_t num_groups, bool channels_last);

// Instance norm normalizes each sample's own variance, which one value does
// not have: nn.InstanceNorm1d's ValueError for one spatial position, and,
// where data checks run (kernel_registry.h), for a sample with exactly one
// valid position. A sample without valid positions gives zeros.
void check_instance_norm_args(
    const char* op, const at::Tensor& input, const std::optional<at::Tensor>& padding_mask, bool channels_last);

}  // namespace masknorm
