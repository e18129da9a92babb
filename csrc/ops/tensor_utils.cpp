// Tensor helpers (see tensor_utils.h).
#include "tensor_utils.h"

namespace masknorm {

at::ScalarType opmath_dtype(const at::Tensor& input) {
  return input.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

at::Tensor contiguous_mask(const std::optional<at::Tensor>& padding_mask) {
  if (!padding_mask.has_value() || !padding_mask->defined()) return at::Tensor();
  return padding_mask->contiguous();
}

at::Tensor vector_as(const at::Tensor& t, int64_t size, at::ScalarType dtype) {
  // Parameters and statistics usually come ready: no dispatcher calls then
  const bool dense = t.dim() == 1 && t.size(0) == size && t.is_contiguous();
  if (dense && t.scalar_type() == dtype) return t;
  if (dense && t.is_cpu() && dtype == at::kFloat && at::isReducedFloatingType(t.scalar_type())) {
    // A bf16/fp16 module's parameters, widened in a loop: .to() costs a
    // dispatch and a TensorIterator each, a sizeable part of a small call.
    at::Tensor out = at::empty({size}, t.options().dtype(at::kFloat));
    AT_DISPATCH_REDUCED_FLOATING_TYPES(t.scalar_type(), "vector_as", [&] {
      const scalar_t* src = t.const_data_ptr<scalar_t>();
      float* dst = out.mutable_data_ptr<float>();
      for (int64_t i = 0; i < size; ++i) dst[i] = static_cast<float>(src[i]);
    });
    return out;
  }
  return t.reshape({size}).to(dtype).contiguous();
}

at::Tensor feature_as_opmath(const std::optional<at::Tensor>& t, int64_t size, const at::Tensor& input) {
  if (!t.has_value() || !t->defined()) return at::Tensor();
  return vector_as(*t, size, opmath_dtype(input));
}

std::vector<int64_t> leading_shape(const at::Tensor& input, at::IntArrayRef normalized_shape) {
  const auto sizes = input.sizes();
  return std::vector<int64_t>(sizes.begin(), sizes.end() - normalized_shape.size());
}

BatchNormLayout batch_norm_layout(const at::Tensor& input, bool channels_last) {
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
    g.channels_last = false;
  }
  return g;
}

NormAxes batch_norm_axes(const at::Tensor& input, const at::Tensor& padding_mask, bool channels_last) {
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
  if (padding_mask.defined()) axes.valid = padding_mask.logical_not().reshape(mask_view);
  return axes;
}

std::vector<int64_t> group_norm_view(const BatchNormLayout& layout, int64_t groups) {
  const int64_t D = groups > 0 ? layout.C / groups : 0;
  if (layout.channels_last) return {layout.N, layout.L, groups, D};
  return {layout.N, groups, D, layout.L};
}

NormAxes group_norm_axes(const BatchNormLayout& layout, int64_t groups, const at::Tensor& padding_mask) {
  NormAxes axes;
  const int64_t N = layout.N, L = layout.L, D = groups > 0 ? layout.C / groups : 0;
  std::vector<int64_t> mask_view;
  if (layout.channels_last) {
    axes.stat_dims = {1, 3};
    axes.param_dims = {0, 1};
    axes.param_view = {1, 1, groups, D};
    axes.stat_view = {N, 1, groups, 1};
    mask_view = {N, L, 1, 1};
  } else {
    axes.stat_dims = {2, 3};
    axes.param_dims = {0, 3};
    axes.param_view = {1, groups, D, 1};
    axes.stat_view = {N, groups, 1, 1};
    mask_view = {N, 1, 1, L};
  }
  if (padding_mask.defined()) axes.valid = padding_mask.logical_not().reshape(mask_view);
  return axes;
}

NormAxes row_norm_axes(const at::Tensor& input, at::IntArrayRef normalized_shape, const at::Tensor& padding_mask) {
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
  if (padding_mask.defined()) axes.valid = padding_mask.logical_not().reshape(axes.stat_view);
  return axes;
}

at::Tensor where_valid(const at::Tensor& t, const at::Tensor& valid) {
  return valid.defined() ? at::where(valid, t, 0) : t;
}

at::Tensor sum_over(const at::Tensor& t, at::IntArrayRef dims, bool keepdim) {
  return dims.empty() ? t : t.sum(dims, keepdim);
}

at::Tensor valid_count(const NormAxes& axes, const at::Tensor& input, at::ScalarType dtype) {
  if (axes.valid.defined()) {
    return axes.valid.expand(input.sizes()).sum(axes.stat_dims, /*keepdim=*/true, dtype);
  }
  double n = 1;
  for (const int64_t d : axes.stat_dims) n *= static_cast<double>(input.size(d));
  return at::scalar_tensor(n, input.options().dtype(dtype));
}

}  // namespace masknorm
