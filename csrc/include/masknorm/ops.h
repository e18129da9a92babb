// masknorm's C++ API: each function calls the registered op through the
// dispatcher (autograd, every backend, torch.compile tracing apply).
// Schemas and semantics: README.md, section "Ops".
#pragma once

#include <ATen/ATen.h>

#include <array>
#include <optional>
#include <string>
#include <tuple>

namespace masknorm {

// Returns (output, save_mean, save_invstd, count).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> batch_norm(
    const at::Tensor& input,
    const std::optional<at::Tensor>& padding_mask,
    const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& running_mean,
    const std::optional<at::Tensor>& running_var,
    bool training,
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

// In place: running = (1 - f) * running + f * batch, f = momentum or 1 / num_batches_tracked.
void batch_norm_update_running_stats(
    at::Tensor& running_mean,
    at::Tensor& running_var,
    const at::Tensor& save_mean,
    const at::Tensor& save_invstd,
    const at::Tensor& count,
    double eps,
    std::optional<double> momentum,
    const std::optional<at::Tensor>& num_batches_tracked);

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

// The CPU kernel build in use: "default" (portable), "avx2" or "avx512".
std::string cpu_kernels_isa();

}  // namespace masknorm
