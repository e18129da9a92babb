// CPU loops of the batch-norm stages (kernels.h: BatchNormStatsArgs,
// BatchNormMergeStatsArgs, BatchNormElemtArgs, BatchNormBackwardReduceArgs,
// BatchNormBackwardElemtArgs). The op (../batch_norm.cpp) has checked the
// arguments and prepared contiguous tensors and outputs.
//
// Two memory layouts, one set of formulas:
//  - "channels last": rows of C contiguous channels, one mask entry per row
//    (layouts NC and NLC).
//  - "channels first": (N, C, L) planes; the mask (N, L) selects positions
//    inside each contiguous row of L (layout NCL).
// Statistics come from one pass of sums of deviations from a shift near the
// mean over the rows in memory order (channels last), or from chunks of a
// channel's plane rows merged with Chan's formula (channels first), each
// with a second pass where the shift is far out in the spread;
// padded positions are skipped or cleared with a bit mask, never multiplied
// by zero, so NaN/inf there cannot leak.
// The loops themselves are in channel_loops.h (shared with group norm).
#include "channel_loops.h"
#include "isa_select.h"

namespace masknorm::cpu {

// ------------------------------------------------------------------ kernels

void batch_norm_stats(const BatchNormStatsArgs& a) {
  const BatchNormLayout g = loop_layout(a.layout);
  const MaskByte* pad = padding_bytes(a.padding_mask);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, a.input.scalar_type(), "masknorm_batch_norm_stats", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    const scalar_t* x = a.input.const_data_ptr<scalar_t>();
    opmath_t* mean = a.mean.mutable_data_ptr<opmath_t>();
    opmath_t* m2 = a.m2.mutable_data_ptr<opmath_t>();
    int64_t count;
    if (g.channels_last) {
      count = count_valid(pad, g.positions());
      moments_channels_last<scalar_t>(x, pad, g.positions(), g.C, mean, m2);
    } else {
      std::optional<MaskLanes<opmath_t>> lanes;
      if (pad) lanes.emplace(pad, g.N, g.L);
      count = lanes ? lanes->total : g.positions();
      moments_channels_first<scalar_t>(x, lanes ? &*lanes : nullptr, g.N, g.C, g.L, mean, m2);
    }
    *a.count.mutable_data_ptr<int64_t>() = count;
  });
}

void batch_norm_merge_stats(const BatchNormMergeStatsArgs& a) {
  int64_t* batches = a.num_batches_tracked.defined() ? a.num_batches_tracked.mutable_data_ptr<int64_t>() : nullptr;
  if (batches) ++*batches;
  const int64_t* part_count = a.part_count.const_data_ptr<int64_t>();
  int64_t total = 0;
  for (int64_t p = 0; p < a.parts; ++p) total += part_count[p];
  *a.count.mutable_data_ptr<int64_t>() = total;
  const bool update = a.running_mean.defined() && total >= 2;
  // Scalar math: factor = momentum, or 1 / num_batches_tracked (cumulative average)
  const double factor = a.has_momentum ? a.momentum : 1.0 / double(batches ? *batches : 1);
  AT_DISPATCH_FLOATING_TYPES(a.mean.scalar_type(), "masknorm_batch_norm_merge_stats", [&] {
    const scalar_t* part_mean = a.part_mean.const_data_ptr<scalar_t>();
    const scalar_t* part_m2 = a.part_m2.const_data_ptr<scalar_t>();
    scalar_t* mean = a.mean.mutable_data_ptr<scalar_t>();
    scalar_t* invstd = a.invstd.mutable_data_ptr<scalar_t>();
    scalar_t* running_mean = update ? a.running_mean.mutable_data_ptr<scalar_t>() : nullptr;
    scalar_t* running_var = update ? a.running_var.mutable_data_ptr<scalar_t>() : nullptr;
    for (int64_t c = 0; c < a.C; ++c) {
      Moments<MergeT> acc;  // parts in order: the same result for any thread count
      for (int64_t p = 0; p < a.parts; ++p) {
        acc.merge({part_count[p], MergeT(part_mean[p * a.C + c]), MergeT(part_m2[p * a.C + c])});
      }
      mean[c] = scalar_t(acc.mean);
      invstd[c] = acc.count > 0 ? scalar_t(1 / std::sqrt(acc.m2 / MergeT(acc.count) + a.eps)) : scalar_t(0);
      if (update) {
        // Scalar math: running = (1 - factor) * running + factor * batch, unbiased variance
        const double unbiased = double(acc.m2) / double(acc.count - 1);
        running_mean[c] = scalar_t((1.0 - factor) * double(running_mean[c]) + factor * double(acc.mean));
        running_var[c] = scalar_t((1.0 - factor) * double(running_var[c]) + factor * unbiased);
      }
    }
  });
}

void batch_norm_elemt(const BatchNormElemtArgs& a) {
  const BatchNormLayout g = loop_layout(a.layout);
  const MaskByte* pad = padding_bytes(a.padding_mask);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, a.input.scalar_type(), "masknorm_batch_norm_elemt", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    // Eval: the statistics set from the running ones first (kernels.h).
    const bool eval = a.running_var.defined();
    const opmath_t* running_mean = eval ? a.running_mean.const_data_ptr<opmath_t>() : nullptr;
    const opmath_t* running_var = eval ? a.running_var.const_data_ptr<opmath_t>() : nullptr;
    opmath_t* eval_mean = eval ? a.mean.mutable_data_ptr<opmath_t>() : nullptr;
    opmath_t* eval_invstd = eval ? a.invstd.mutable_data_ptr<opmath_t>() : nullptr;
    const auto eps = static_cast<opmath_t>(a.eps);
    const opmath_t* invstd = a.invstd.const_data_ptr<opmath_t>();  // read after eval sets it
    const opmath_t* w = a.weight.defined() ? a.weight.const_data_ptr<opmath_t>() : nullptr;
    const opmath_t* b = a.bias.defined() ? a.bias.const_data_ptr<opmath_t>() : nullptr;
    // Affine folded per channel: out = (x - mean) * alpha + beta
    std::vector<opmath_t> alpha(g.C), beta(g.C);
    for (int64_t c = 0; c < g.C; ++c) {
      if (eval) {
        eval_mean[c] = running_mean[c];
        eval_invstd[c] = opmath_t(1) / std::sqrt(running_var[c] + eps);
      }
      alpha[c] = w ? w[c] * invstd[c] : invstd[c];
      beta[c] = b ? b[c] : opmath_t(0);
    }
    std::optional<MaskLanes<opmath_t>> lanes;
    if (pad && !g.channels_last) lanes.emplace(pad, g.N, g.L);
    affine_per_channel<ChannelAffine::kNormalize, scalar_t>(
        g, nullptr, a.input.const_data_ptr<scalar_t>(), pad, lanes ? &*lanes : nullptr,
        a.mean.const_data_ptr<opmath_t>(), nullptr, alpha.data(), beta.data(), a.output.mutable_data_ptr<scalar_t>());
  });
}

void batch_norm_backward_reduce(const BatchNormBackwardReduceArgs& a) {
  const BatchNormLayout g = loop_layout(a.layout);
  const MaskByte* pad = padding_bytes(a.padding_mask);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, a.input.scalar_type(), "masknorm_batch_norm_backward_reduce", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    std::optional<MaskLanes<opmath_t>> lanes;
    if (pad && !g.channels_last) lanes.emplace(pad, g.N, g.L);
    opmath_t* sum_dy = a.sum_dy.mutable_data_ptr<opmath_t>();
    opmath_t* sum_dy_xhat = a.sum_dy_xhat.mutable_data_ptr<opmath_t>();
    grad_sums<scalar_t>(
        g, a.grad_output.const_data_ptr<scalar_t>(), a.input.const_data_ptr<scalar_t>(), pad,
        lanes ? &*lanes : nullptr, a.mean.const_data_ptr<opmath_t>(), sum_dy, sum_dy_xhat);
    const opmath_t* invstd = a.invstd.const_data_ptr<opmath_t>();
    for (int64_t c = 0; c < g.C; ++c) sum_dy_xhat[c] *= invstd[c];  // sum(dy * (x - mean)) -> sum(dy * xhat)
  });
}

void batch_norm_backward_elemt(const BatchNormBackwardElemtArgs& a) {
  const BatchNormLayout g = loop_layout(a.layout);
  const MaskByte* pad = padding_bytes(a.padding_mask);
  const bool batch_stats = a.sum_dy.defined();
  const int64_t count = batch_stats ? *a.count.const_data_ptr<int64_t>() : 0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, a.input.scalar_type(), "masknorm_batch_norm_backward_elemt", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    const opmath_t* invstd = a.invstd.const_data_ptr<opmath_t>();
    const opmath_t* w = a.weight.defined() ? a.weight.const_data_ptr<opmath_t>() : nullptr;
    // dx = (dy + k) * k_dy + (x - mean) * k_x, per channel:
    //   k_dy = w * invstd; with batch statistics (n = max(count, 1), as the
    //   generic kernels) k = -sum_dy / n, k_x = -k_dy * invstd * sum_dy_xhat / n;
    //   with given statistics dx = dy * k_dy (x is not read).
    std::vector<opmath_t> k_dy(g.C), k_x(g.C, 0), k(g.C, 0);
    const opmath_t inv_n = opmath_t(1) / opmath_t(std::max<int64_t>(count, 1));
    const opmath_t* sum_dy = batch_stats ? a.sum_dy.const_data_ptr<opmath_t>() : nullptr;
    const opmath_t* sum_dy_xhat = batch_stats ? a.sum_dy_xhat.const_data_ptr<opmath_t>() : nullptr;
    for (int64_t c = 0; c < g.C; ++c) {
      k_dy[c] = w ? w[c] * invstd[c] : invstd[c];
      if (batch_stats) {
        k_x[c] = -k_dy[c] * invstd[c] * sum_dy_xhat[c] * inv_n;
        k[c] = -sum_dy[c] * inv_n;
      }
    }
    std::optional<MaskLanes<opmath_t>> lanes;
    if (pad && !g.channels_last) lanes.emplace(pad, g.N, g.L);
    const scalar_t* dy = a.grad_output.const_data_ptr<scalar_t>();
    const scalar_t* x = a.input.const_data_ptr<scalar_t>();
    const opmath_t* mean = a.mean.const_data_ptr<opmath_t>();
    scalar_t* dx = a.grad_input.mutable_data_ptr<scalar_t>();
    const auto* lanes_ptr = lanes ? &*lanes : nullptr;
    if (batch_stats) {
      affine_per_channel<ChannelAffine::kGradient, scalar_t>(
          g, dy, x, pad, lanes_ptr, mean, k_dy.data(), k_x.data(), k.data(), dx);
    } else {
      affine_per_channel<ChannelAffine::kGradientOfDy, scalar_t>(
          g, dy, nullptr, pad, lanes_ptr, nullptr, k_dy.data(), nullptr, nullptr, dx);
    }
  });
}

}  // namespace masknorm::cpu
