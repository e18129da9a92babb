// The batch-norm stage kernels (kernels.h) written with ATen ops: they run on
// any device torch supports (MPS, XPU, ...; CUDA when the fused kernels are
// off) and, forced with masknorm._C._force_generic_kernels, on the CPU, where
// the whole test suite checks them. Masked sums select padding out with
// at::where (never multiply by 0: NaN stored there must not leak); half
// inputs accumulate in float32 (the Args' opmath tensors).
// Neighbours: ../batch_norm.cpp (the ops), ../cpu/batch_norm_kernel.cpp and
// ../cuda/batch_norm_kernel.cu (the same kernels as loops).
#include "../kernels.h"
#include "../tensor_utils.h"

namespace masknorm::generic {
namespace {

using at::Tensor;

Tensor per_channel(const Tensor& t, const NormAxes& axes) { return t.view(axes.stat_view); }

}  // namespace

void batch_norm_stats(const BatchNormStatsArgs& a) {
  const NormAxes axes = batch_norm_axes(a.input, a.padding_mask, a.layout.channels_last);
  const Tensor x = where_valid(a.input.to(a.mean.scalar_type()), axes.valid);
  const Tensor count = a.padding_mask.defined() ? a.padding_mask.logical_not().sum(at::kLong)
                                                : at::scalar_tensor(a.layout.positions(), a.count.options());
  const Tensor n = count.to(a.mean.scalar_type()).clamp_min(1);
  // Corrected two passes: the mean, then deviations from it and their squares;
  // the deviations' sum corrects the first pass's rounding (no bias in M2 on
  // data with a large offset).
  const Tensor mean = sum_over(x, axes.stat_dims, /*keepdim=*/true) / n;
  const Tensor d = where_valid(x - mean, axes.valid);
  const Tensor ds = sum_over(d, axes.stat_dims, /*keepdim=*/true);
  a.mean.copy_((mean + ds / n).reshape({-1}));
  a.m2.copy_((sum_over(d * d, axes.stat_dims, /*keepdim=*/true) - ds * ds / n).clamp_min(0).reshape({-1}));
  a.count.copy_(count);
}

void batch_norm_merge_stats(const BatchNormMergeStatsArgs& a) {
  const auto opmath = a.mean.scalar_type();
  const Tensor has_values = (a.part_count > 0).unsqueeze(1);  // (P, 1): parts with count 0 are skipped
  const Tensor counts = a.part_count.to(opmath).unsqueeze(1);
  const Tensor total = a.part_count.sum();
  const Tensor n = total.to(opmath).clamp_min(1);
  // Chan et al. over P parts: the count-weighted mean, then each part's M2
  // plus its count times its mean's squared distance to the merged mean.
  const Tensor mean = at::where(has_values, counts * a.part_mean, 0).sum(0) / n;
  const Tensor delta = a.part_mean - mean;
  const Tensor m2 = at::where(has_values, a.part_m2 + counts * delta * delta, 0).sum(0);
  a.mean.copy_(mean);
  a.invstd.copy_(at::where(total > 0, (m2 / n + a.eps).rsqrt(), 0));
  a.count.copy_(total);
  if (a.num_batches_tracked.defined()) a.num_batches_tracked.add_(1);
  if (!a.running_mean.defined()) return;
  // The factor stays a device tensor with momentum=None: no host sync.
  const Tensor factor = a.has_momentum
      ? at::scalar_tensor(a.momentum, a.mean.options().dtype(at::kDouble))
      : a.num_batches_tracked.to(at::kDouble).reciprocal().reshape({});
  const Tensor update = total >= 2;
  const Tensor unbiased = m2.to(at::kDouble) / (total.to(at::kDouble) - 1).clamp_min(1);
  const auto moved = [&](const Tensor& running, const Tensor& batch) {
    return at::where(update, running.to(at::kDouble) * (1 - factor) + batch.to(at::kDouble) * factor, running.to(at::kDouble));
  };
  a.running_mean.copy_(moved(a.running_mean, mean));
  a.running_var.copy_(moved(a.running_var, unbiased));
}

void batch_norm_elemt(const BatchNormElemtArgs& a) {
  set_from_running_stats(a);
  const NormAxes axes = batch_norm_axes(a.input, a.padding_mask, a.layout.channels_last);
  const Tensor alpha = a.weight.defined() ? a.invstd * a.weight : a.invstd;
  Tensor y = (a.input.to(a.mean.scalar_type()) - per_channel(a.mean, axes)) * per_channel(alpha, axes);
  if (a.bias.defined()) y = y + per_channel(a.bias, axes);
  a.output.copy_(where_valid(y, axes.valid));
}

void batch_norm_backward_reduce(const BatchNormBackwardReduceArgs& a) {
  const NormAxes axes = batch_norm_axes(a.input, a.padding_mask, a.layout.channels_last);
  const auto opmath = a.mean.scalar_type();
  const Tensor dy = where_valid(a.grad_output.to(opmath), axes.valid);
  const Tensor xhat = (a.input.to(opmath) - per_channel(a.mean, axes)) * per_channel(a.invstd, axes);
  a.sum_dy.copy_(sum_over(dy, axes.stat_dims, /*keepdim=*/false));
  a.sum_dy_xhat.copy_(sum_over(where_valid(dy * xhat, axes.valid), axes.stat_dims, /*keepdim=*/false));
}

void batch_norm_backward_elemt(const BatchNormBackwardElemtArgs& a) {
  const NormAxes axes = batch_norm_axes(a.input, a.padding_mask, a.layout.channels_last);
  const auto opmath = a.mean.scalar_type();
  const Tensor invstd = per_channel(a.invstd, axes);
  const Tensor k_dy = a.weight.defined() ? invstd * per_channel(a.weight, axes) : invstd;
  Tensor g = a.grad_output.to(opmath);
  if (a.sum_dy.defined()) {
    const Tensor n = a.count.to(opmath).clamp_min(1);
    const Tensor xhat = (a.input.to(opmath) - per_channel(a.mean, axes)) * invstd;
    g = g - per_channel(a.sum_dy, axes) / n - xhat * (per_channel(a.sum_dy_xhat, axes) / n);
  }
  a.grad_input.copy_(where_valid(g * k_dy, axes.valid));
}

}  // namespace masknorm::generic
