// Argument checks shared by every masknorm op, so each kernel (CPU, and CUDA
// when built) rejects bad input with one wording: the op, the argument, what
// was expected and what came.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <vector>

namespace masknorm {

// input: a floating-point tensor with at least `min_dim` dimensions.
void check_input(const at::Tensor& input, const char* op, int64_t min_dim);

// padding_mask: bool, on input's device, of shape `expected_shape`.
void check_padding_mask(
    const std::optional<at::Tensor>& padding_mask,
    at::IntArrayRef expected_shape,
    const at::Tensor& input,
    const char* op,
    const char* shape_rule);

// A per-feature tensor (weight, bias, running statistics, saved statistics):
// floating point, on input's device, of shape `expected_shape`.
void check_feature_tensor(
    const std::optional<at::Tensor>& t,
    const char* name,
    at::IntArrayRef expected_shape,
    const at::Tensor& input,
    const char* op);

// grad_output has input's shape and device.
void check_grad_output(const at::Tensor& grad_output, const at::Tensor& input, const char* op);

// normalized_shape is non-empty, positive and equals input's trailing dims.
void check_normalized_shape(at::IntArrayRef normalized_shape, const at::Tensor& input, const char* op);

// Per-row tensor shape for layer/rms norm: input.shape[:-len(normalized_shape)].
std::vector<int64_t> leading_shape(const at::Tensor& input, at::IntArrayRef normalized_shape);

// A mask as a contiguous bool tensor, or an undefined tensor when absent.
at::Tensor contiguous_mask(const std::optional<at::Tensor>& padding_mask);

// A per-feature tensor as a contiguous tensor of the accumulation dtype, or
// `fill` repeated when absent (weight 1, bias 0).
at::Tensor feature_as_opmath(
    const std::optional<at::Tensor>& t, int64_t size, const at::Tensor& input, double fill);

// float for half/bfloat16/float, double for double.
at::ScalarType opmath_dtype(const at::Tensor& input);

}  // namespace masknorm

namespace masknorm {

// A layer/RMS-norm input seen as M rows of D = prod(normalized_shape) values.
struct RowNormShape {
  int64_t rows = 0, width = 0;
  std::vector<int64_t> leading;  // input.shape[:-len(normalized_shape)]
};

// Validates input, normalized_shape, padding_mask (shape `leading`), weight
// and bias (shape normalized_shape) for layer_norm / rms_norm and their
// backward ops.
RowNormShape check_row_norm_args(
    const char* op,
    const at::Tensor& input,
    at::IntArrayRef normalized_shape,
    const std::optional<at::Tensor>& padding_mask,
    const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias);


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

// For the backward ops (their kernels and the differentiable composite):
// the forward op's checks plus grad_output (input's shape) and the saved
// statistics, (C,) for batch norm, one per row for layer norm (mean, when
// given) and RMS norm (rstd).
BatchNormLayout check_batch_norm_backward_args(
    const at::Tensor& grad_output,
    const at::Tensor& input,
    const std::optional<at::Tensor>& padding_mask,
    const std::optional<at::Tensor>& weight,
    const at::Tensor& save_mean,
    const at::Tensor& save_invstd,
    bool channels_last);

RowNormShape check_row_norm_backward_args(
    const char* op,
    const at::Tensor& grad_output,
    const at::Tensor& input,
    at::IntArrayRef normalized_shape,
    const std::optional<at::Tensor>& padding_mask,
    const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& mean,
    const at::Tensor& rstd);

void check_running_stats_update_args(
    const at::Tensor& running_mean,
    const at::Tensor& running_var,
    const at::Tensor& save_mean,
    const at::Tensor& save_invstd,
    const at::Tensor& count,
    std::optional<double> momentum,
    const std::optional<at::Tensor>& num_batches_tracked);

}  // namespace masknorm
