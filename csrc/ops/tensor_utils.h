// Tensor helpers shared by the ops (batch_norm.cpp, row_norm.cpp), the
// generic kernels (generic/) and the differentiable backward
// (autograd/differentiable_backward.cpp): dtypes, contiguous inputs, and how
// a norm's mask, statistics and parameters line up with its input.
#pragma once

#include "kernels.h"

#include <optional>
#include <vector>

namespace masknorm {

// The accumulation dtype: float64 for float64 input, float32 otherwise.
at::ScalarType opmath_dtype(const at::Tensor& input);

// A mask as a contiguous bool tensor, or an undefined tensor when absent.
at::Tensor contiguous_mask(const std::optional<at::Tensor>& padding_mask);

// t as a contiguous (size,) tensor of dtype (t itself when it is one).
at::Tensor vector_as(const at::Tensor& t, int64_t size, at::ScalarType dtype);

// A per-feature tensor as a contiguous (size,) tensor of input's
// accumulation dtype, or an undefined tensor when absent.
at::Tensor feature_as_opmath(const std::optional<at::Tensor>& t, int64_t size, const at::Tensor& input);

// input.shape[:-len(normalized_shape)]: the shape of the mask and of the per-row statistics.
std::vector<int64_t> leading_shape(const at::Tensor& input, at::IntArrayRef normalized_shape);

// The layout of a batch-norm input (the caller has checked its rank).
BatchNormLayout batch_norm_layout(const at::Tensor& input, bool channels_last);

// How a norm's tensors line up with its input, for code written with ATen ops.
struct NormAxes {
  at::Tensor valid;                  // bool, broadcasts against input; undefined: all valid
  std::vector<int64_t> stat_dims;    // dims each statistic is taken over
  std::vector<int64_t> param_dims;   // dims weight/bias gradients are summed over
  std::vector<int64_t> param_view;   // weight viewed to broadcast against input
  std::vector<int64_t> stat_view;    // saved statistics viewed to broadcast against input
};

// Batch norm: statistics per channel over the (N[, L]) valid positions.
NormAxes batch_norm_axes(const at::Tensor& input, const at::Tensor& padding_mask, bool channels_last);

// Group norm of a batch-norm layout with `groups` groups, on the input
// viewed as group_norm_view(layout, groups): (N, G, C / G, L) channels first,
// (N, L, G, C / G) channels last. Statistics per (sample, group) over the
// group's channels and the sample's valid positions; parameter gradients per
// channel, summed over samples and positions.
std::vector<int64_t> group_norm_view(const BatchNormLayout& layout, int64_t groups);
NormAxes group_norm_axes(const BatchNormLayout& layout, int64_t groups, const at::Tensor& padding_mask);

// Layer / RMS norm: statistics per row over the trailing normalized_shape
// dims, parameter gradients summed over the leading (row) dims.
NormAxes row_norm_axes(const at::Tensor& input, at::IntArrayRef normalized_shape, const at::Tensor& padding_mask);

// t at valid positions, 0 at padding: selected, so NaN/inf stored there
// cannot leak, and the derivative of the result is 0 at padding.
at::Tensor where_valid(const at::Tensor& t, const at::Tensor& valid);

// t summed over dims (t itself when dims is empty: at::sum would reduce all).
at::Tensor sum_over(const at::Tensor& t, at::IntArrayRef dims, bool keepdim);

// Number of valid positions in each statistic's group (keepdim shape), of dtype `dtype`.
at::Tensor valid_count(const NormAxes& axes, const at::Tensor& input, at::ScalarType dtype);

}  // namespace masknorm
