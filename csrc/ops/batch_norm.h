// masknorm::batch_norm: how the ops see a batch, and the argument checks that
// every backend's kernel runs first.
#pragma once

#include <ATen/ATen.h>

#include <optional>

namespace masknorm {

// A batch-norm input as the kernels see it.
//  channels_inner: rows of C contiguous channels (2-D (N, C) input, or
//  (N, L, C) with channels_last); otherwise (N, C, L) planes.
struct BatchNormLayout {
  int64_t N = 0, C = 0, L = 1;
  bool channels_inner = true;
  int64_t rows() const { return N * L; }
};

// Validates input, padding_mask and the per-channel tensors (any of which may
// be absent) and returns the layout. `op` names the op in error messages.
BatchNormLayout check_batch_norm_args(
    const char* op,
    const at::Tensor& input,
    const std::optional<at::Tensor>& padding_mask,
    const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& running_mean,
    const std::optional<at::Tensor>& running_var,
    bool channels_last);

void check_running_stats_update_args(
    const at::Tensor& running_mean,
    const at::Tensor& running_var,
    const at::Tensor& save_mean,
    const at::Tensor& save_invstd,
    const at::Tensor& count,
    std::optional<double> momentum,
    const std::optional<at::Tensor>& num_batches_tracked);

}  // namespace masknorm
