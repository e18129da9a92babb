// masknorm's C++ API: each function calls the registered op through the
// dispatcher (autograd, every backend, torch.compile tracing apply).
// Schemas and semantics: docs/ops.md. The ops' functions are defined in
// csrc/ops/batch_norm.cpp, row_norm.cpp and group_norm.cpp; cpu_kernels_isa
// in csrc/ops/cpu/isa_select.cpp, kernels_for_device in
// csrc/ops/kernel_registry.cpp.
#pragma once

#include <ATen/ATen.h>

#include <array>
#include <optional>
#include <string>
#include <tuple>

namespace masknorm {

// ------------------------------------------------------------------ batch norm

// nn.BatchNorm1d's forward over the valid positions. Returns (output,
// save_mean, save_invstd). In training, statistics come from the valid
// positions; running_mean/running_var, when given, are updated in place
// (unbiased variance; factor momentum, or 1 / num_batches_tracked when
// momentum is nullopt) unless the batch has no valid position, and
// num_batches_tracked, when given, is incremented. In eval, the running
// statistics normalize.
std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm(
    const at::Tensor& input,
    const std::optional<at::Tensor>& padding_mask,
    const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& running_mean,
    const std::optional<at::Tensor>& running_var,
    const std::optional<at::Tensor>& num_batches_tracked,
    bool training,
    std::optional<double> momentum,
    double eps,
    bool channels_last);

// Returns (grad_input, grad_weight, grad_bias); entries not in output_mask are undefined.
std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_backward(
    const at::Tensor& grad_output,
    const at::Tensor& input,
    const std::optional<at::Tensor>& padding_mask,
    const std::optional<at::Tensor>& weight,
    const at::Tensor& save_mean,
    const at::Tensor& save_invstd,
    bool training,
    bool channels_last,
    std::array<bool, 3> output_mask);

// The stages batch_norm is made of, for synchronized batch norm across
// processes (masknorm.MaskedSyncBatchNorm) and other compositions.

// Per-channel (mean, m2, count) of the valid positions: m2 is the sum of
// squared deviations, count an int64 scalar.
std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_stats(
    const at::Tensor& input, const std::optional<at::Tensor>& padding_mask, bool channels_last);

// Merges the statistics of P parts (mean and m2 (P, C), count (P,); parts
// with count 0 are skipped) into (mean, invstd, count) and updates the
// running statistics as batch_norm does.
std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_merge_stats(
    const at::Tensor& mean,
    const at::Tensor& m2,
    const at::Tensor& count,
    const std::optional<at::Tensor>& running_mean,
    const std::optional<at::Tensor>& running_var,
    const std::optional<at::Tensor>& num_batches_tracked,
    std::optional<double> momentum,
    double eps);

// (x - mean) * invstd * weight + bias at valid positions, 0 at padding.
at::Tensor batch_norm_elemt(
    const at::Tensor& input,
    const std::optional<at::Tensor>& padding_mask,
    const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias,
    const at::Tensor& mean,
    const at::Tensor& invstd,
    bool channels_last);

// Per channel over the valid positions: (sum(dy), sum(dy * xhat)), the bias
// and weight gradients.
std::tuple<at::Tensor, at::Tensor> batch_norm_backward_reduce(
    const at::Tensor& grad_output,
    const at::Tensor& input,
    const std::optional<at::Tensor>& padding_mask,
    const at::Tensor& mean,
    const at::Tensor& invstd,
    bool channels_last);

// The input gradient from (possibly all-reduced) sums over `count` valid
// positions; without sums, the statistics are taken as constants (eval).
at::Tensor batch_norm_backward_elemt(
    const at::Tensor& grad_output,
    const at::Tensor& input,
    const std::optional<at::Tensor>& padding_mask,
    const std::optional<at::Tensor>& weight,
    const at::Tensor& mean,
    const at::Tensor& invstd,
    const std::optional<at::Tensor>& sum_dy,
    const std::optional<at::Tensor>& sum_dy_xhat,
    const std::optional<at::Tensor>& count,
    bool channels_last);

// ------------------------------------------------------------ layer / RMS norm

// Returns (output, mean, rstd).
std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm(
    const at::Tensor& input,
    at::IntArrayRef normalized_shape,
    const std::optional<at::Tensor>& padding_mask,
    const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias,
    double eps);

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_backward(
    const at::Tensor& grad_output,
    const at::Tensor& input,
    at::IntArrayRef normalized_shape,
    const std::optional<at::Tensor>& padding_mask,
    const at::Tensor& mean,
    const at::Tensor& rstd,
    const std::optional<at::Tensor>& weight,
    std::array<bool, 3> output_mask);

// Returns (output, rstd).
std::tuple<at::Tensor, at::Tensor> rms_norm(
    const at::Tensor& input,
    at::IntArrayRef normalized_shape,
    const std::optional<at::Tensor>& padding_mask,
    const std::optional<at::Tensor>& weight,
    std::optional<double> eps);

std::tuple<at::Tensor, at::Tensor> rms_norm_backward(
    const at::Tensor& grad_output,
    const at::Tensor& input,
    at::IntArrayRef normalized_shape,
    const std::optional<at::Tensor>& padding_mask,
    const at::Tensor& rstd,
    const std::optional<at::Tensor>& weight,
    std::array<bool, 2> output_mask);

// ------------------------------------------------------ group / instance norm

// nn.GroupNorm's forward over each sample's valid positions: statistics per
// (sample, group) over the group's channels. Input (N, C), (N, C, L), or
// (N, L, C) with channels_last; padding_mask (N,) or (N, L). Returns
// (output, mean, rstd), the statistics (N, num_groups).
std::tuple<at::Tensor, at::Tensor, at::Tensor> group_norm(
    const at::Tensor& input,
    const std::optional<at::Tensor>& padding_mask,
    const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias,
    int64_t num_groups,
    double eps,
    bool channels_last);

std::tuple<at::Tensor, at::Tensor, at::Tensor> group_norm_backward(
    const at::Tensor& grad_output,
    const at::Tensor& input,
    const std::optional<at::Tensor>& padding_mask,
    const std::optional<at::Tensor>& weight,
    const at::Tensor& mean,
    const at::Tensor& rstd,
    int64_t num_groups,
    bool channels_last,
    std::array<bool, 3> output_mask);

// nn.InstanceNorm1d's forward with the input's statistics (training, or no
// running statistics tracked): group norm with one group per channel;
// running_mean/running_var, when given, move by momentum towards the average
// over samples of their mean and unbiased variance. With running statistics
// in eval, nn.InstanceNorm1d is batch_norm with training=false. Returns
// (output, mean, rstd), the statistics (N, C); the backward is
// group_norm_backward with num_groups = C.
std::tuple<at::Tensor, at::Tensor, at::Tensor> instance_norm(
    const at::Tensor& input,
    const std::optional<at::Tensor>& padding_mask,
    const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& running_mean,
    const std::optional<at::Tensor>& running_var,
    double momentum,
    double eps,
    bool channels_last);

// ----------------------------------------------------------------- kernels

// The CPU kernel build in use: "default" (portable), "avx2" or "avx512".
std::string cpu_kernels_isa();

// The kernels serving tensors on `device`: a CPU build's name, "cuda" or "generic".
std::string kernels_for_device(const at::Device& device);

}  // namespace masknorm
