// CPU loops of group norm (kernels.h: GroupNormForwardArgs,
// GroupNormBackwardArgs); instance norm is group norm with one group per
// channel. The op (../group_norm.cpp) has checked the arguments and prepared
// contiguous tensors and outputs.
//
// Group norm is batch norm of one sample at a time with the channels of a
// group pooled, so it runs batch norm's loops (channel_loops.h): the
// per-(sample, channel) moments are merged per (sample, group) with Chan's
// formula, and the normalization and input gradient are the one elementwise
// loop out = dy * a + (x - mean) * b + k0 with per-sample coefficients.
// Padded positions are skipped or cleared with a bit mask.
// Channels first, a (sample, group) is one contiguous block of D rows; blocks
// that fit in L2 are done one at a time, reduction then elementwise loop, so
// the input is read from memory once (by_blocks). Otherwise, and channels
// last, the stages run over the whole batch, a sample at a time.
// Neighbours: batch_norm_kernel.cpp, ../generic/group_norm_kernel.cpp (the
// reference), ../cuda/group_norm_kernel.cu.
#include "channel_loops.h"
#include "isa_select.h"

namespace masknorm::cpu {
namespace {

// The layout of one sample alone (N = 1).
BatchNormLayout sample_layout(const BatchNormLayout& g) {
  BatchNormLayout s = g;
  s.N = 1;
  return s;
}

// Runs body(n) for every sample: samples in parallel when there are at least
// as many as threads (the loops inside then run on their own thread), else
// one after another with the loops inside each sample parallel.
template <typename Body>
void for_each_sample(int64_t N, const Body& body) {
  if (N >= at::get_num_threads()) {
    at::parallel_for(0, N, 1, [&](int64_t begin, int64_t end) {
      for (int64_t n = begin; n < end; ++n) body(n);
    });
  } else {
    for (int64_t n = 0; n < N; ++n) body(n);
  }
}

// Per-(sample, channel) moments of the valid positions: mean and M2 (MergeT),
// and each sample's valid count.
template <typename scalar_t>
void channel_moments(
    const BatchNormLayout& g, const scalar_t* x, const MaskByte* pad, std::vector<MergeT>& mean,
    std::vector<MergeT>& m2, std::vector<int64_t>& valid) {
  using opmath_t = at::opmath_type<scalar_t>;
  const int64_t N = g.N, C = g.C, L = g.L;
  mean.assign(N * C, 0);
  m2.assign(N * C, 0);
  valid.assign(N, L);
  if (pad) {
    for (int64_t n = 0; n < N; ++n) valid[n] = count_valid(pad + n * L, L);
  }
  if (g.channels_last) {
    for_each_sample(N, [&](int64_t n) {
      if (valid[n] == 0) return;
      moments_channels_last<scalar_t, MergeT>(
          x + n * L * C, pad ? pad + n * L : nullptr, L, C, mean.data() + n * C, m2.data() + n * C);
    });
    return;
  }
  std::optional<MaskLanes<opmath_t>> lanes;
  if (pad) lanes.emplace(pad, N, L);
  const std::vector<Moments<MergeT>> rows = plane_row_moments(x, lanes ? &*lanes : nullptr, N, C, L);
  for (int64_t i = 0; i < N * C; ++i) {
    mean[i] = rows[i].mean;
    m2[i] = rows[i].m2;
  }
}

// Whether channels-first group norm runs block by block: the block's bytes
// of the `tensors` inputs its passes read (x; dy and x) fit in L2, its rows
// are one segment each (kPlaneSegment), and there are blocks enough for
// every thread. The per-row sums and their order of merging are those of the
// whole-batch loops, so either way gives the same result.
constexpr int64_t kBlockBytes = 256 * 1024;

bool by_blocks(const BatchNormLayout& g, int64_t G, int64_t tensors, int64_t element_size) {
  if (g.channels_last || G <= 0 || g.C <= 0 || g.L > kPlaneSegment) return false;
  return tensors * (g.C / G) * g.L * element_size <= kBlockBytes && g.N * G >= 2 * at::get_num_threads();
}

// A (sample, group)'s mean and 1 / sqrt(var + eps) from its moments; 0 without valid positions.
template <typename opmath_t>
void group_statistics(const Moments<MergeT>& acc, double eps, opmath_t& mean, opmath_t& rstd) {
  mean = opmath_t(acc.mean);
  rstd = acc.count > 0 ? opmath_t(1 / std::sqrt(acc.m2 / MergeT(acc.count) + eps)) : opmath_t(0);
}

// Per-sample coefficients of the elementwise loop, per channel.
template <typename opmath_t>
struct SampleCoefficients {
  std::vector<opmath_t> mean, a, b, k0;
  explicit SampleCoefficients(int64_t C) : mean(C), a(C), b(C), k0(C) {}
};

// The elementwise loop over sample n with per-channel coefficients.
template <ChannelAffine kTerms, typename scalar_t>
void affine_sample(
    const BatchNormLayout& g, int64_t n, const scalar_t* dy, const scalar_t* x, const MaskByte* pad,
    const SampleCoefficients<at::opmath_type<scalar_t>>& k, scalar_t* out) {
  using opmath_t = at::opmath_type<scalar_t>;
  const int64_t offset = n * g.C * g.L;
  const MaskByte* sample_pad = pad ? pad + n * g.L : nullptr;
  std::optional<MaskLanes<opmath_t>> lanes;
  if (sample_pad && !g.channels_last) lanes.emplace(sample_pad, 1, g.L);
  affine_per_channel<kTerms, scalar_t>(
      sample_layout(g), kTerms != ChannelAffine::kNormalize ? dy + offset : nullptr, x + offset, sample_pad,
      lanes ? &*lanes : nullptr, k.mean.data(), k.a.data(), k.b.data(), k.k0.data(), out + offset);
}

// The input-gradient coefficients of one (sample, group) of D channels,
// from its per-channel sums s1 = sum(dy), s2 = sum(dy * (x - mu)) over its
// `count` (valid positions x D) values; w: the group's weights or nullptr.
// Scalar math, with A = sum(w * s1), B = sum(w * s2 * r):
//   dx = dy * (w * r) + (x - mu) * (-r^2 * B / count) + (-r * A / count)
template <typename opmath_t>
void group_gradient_coefficients(
    const opmath_t* s1, const opmath_t* s2, const opmath_t* w, int64_t D, opmath_t mu, opmath_t r, opmath_t count,
    opmath_t* mean, opmath_t* a, opmath_t* b, opmath_t* k0) {
  opmath_t A = 0, B = 0;
  for (int64_t c = 0; c < D; ++c) {
    const opmath_t wc = w ? w[c] : opmath_t(1);
    A += wc * s1[c];
    B += wc * s2[c] * r;
  }
  const opmath_t inv_k = count > 0 ? opmath_t(1) / count : opmath_t(0);
  for (int64_t c = 0; c < D; ++c) {
    mean[c] = mu;
    a[c] = w ? w[c] * r : r;
    b[c] = -r * r * B * inv_k;
    k0[c] = -r * A * inv_k;
  }
}

// Forward over the whole batch (when not by_blocks): every (sample, channel)
// row's moments, merged per (sample, group) into group[n * G + j], the
// statistics, then the normalization a sample at a time.
template <typename scalar_t>
void forward_by_samples(
    const GroupNormForwardArgs& a, const scalar_t* x, const MaskByte* pad, std::vector<Moments<MergeT>>& group) {
  using opmath_t = at::opmath_type<scalar_t>;
  const BatchNormLayout& g = a.layout;
  const int64_t N = g.N, C = g.C, G = a.groups, D = C / G;
  std::vector<MergeT> ch_mean, ch_m2;
  std::vector<int64_t> valid;
  channel_moments<scalar_t>(g, x, pad, ch_mean, ch_m2, valid);
  opmath_t* mean = a.mean.mutable_data_ptr<opmath_t>();
  opmath_t* rstd = a.rstd.mutable_data_ptr<opmath_t>();
  for (int64_t n = 0; n < N; ++n) {
    for (int64_t j = 0; j < G; ++j) {
      Moments<MergeT>& acc = group[n * G + j];
      for (int64_t c = j * D; c < (j + 1) * D; ++c) acc.merge({valid[n], ch_mean[n * C + c], ch_m2[n * C + c]});
      group_statistics(acc, a.eps, mean[n * G + j], rstd[n * G + j]);
    }
  }
  const opmath_t* w = a.weight.defined() ? a.weight.const_data_ptr<opmath_t>() : nullptr;
  const opmath_t* bias = a.bias.defined() ? a.bias.const_data_ptr<opmath_t>() : nullptr;
  scalar_t* out = a.output.mutable_data_ptr<scalar_t>();
  for_each_sample(N, [&](int64_t n) {
    // Affine folded per channel: out = (x - mean) * (rstd * w) + bias
    SampleCoefficients<opmath_t> k(C);
    for (int64_t c = 0; c < C; ++c) {
      const int64_t j = n * G + c / D;
      k.mean[c] = mean[j];
      k.b[c] = w ? rstd[j] * w[c] : rstd[j];
      k.k0[c] = bias ? bias[c] : opmath_t(0);
    }
    affine_sample<ChannelAffine::kNormalize, scalar_t>(g, n, nullptr, x, pad, k, out);
  });
}

// The backward over the whole batch (when not by_blocks), a sample at a
// time: the per-(sample, channel) sums s1, s2 ...
template <typename scalar_t>
void grad_sums_by_samples(
    const GroupNormBackwardArgs& a, const scalar_t* dy, const scalar_t* x, const MaskByte* pad,
    std::vector<at::opmath_type<scalar_t>>& s1, std::vector<at::opmath_type<scalar_t>>& s2) {
  using opmath_t = at::opmath_type<scalar_t>;
  const BatchNormLayout& g = a.layout;
  const int64_t N = g.N, C = g.C, L = g.L, G = a.groups, D = C / G;
  const opmath_t* mean = a.mean.const_data_ptr<opmath_t>();
  for_each_sample(N, [&](int64_t n) {
    const MaskByte* sample_pad = pad ? pad + n * L : nullptr;
    if (sample_pad && count_valid(sample_pad, L) == 0) return;
    SampleCoefficients<opmath_t> k(C);
    for (int64_t c = 0; c < C; ++c) k.mean[c] = mean[n * G + c / D];
    const int64_t offset = n * C * L;
    std::optional<MaskLanes<opmath_t>> lanes;
    if (sample_pad && !g.channels_last) lanes.emplace(sample_pad, 1, L);
    grad_sums<scalar_t>(
        sample_layout(g), dy + offset, x + offset, sample_pad, lanes ? &*lanes : nullptr, k.mean.data(),
        s1.data() + n * C, s2.data() + n * C);
  });
}

// ... and, given them, the input gradient.
template <typename scalar_t>
void grad_input_by_samples(
    const GroupNormBackwardArgs& a, const scalar_t* dy, const scalar_t* x, const MaskByte* pad,
    const std::vector<at::opmath_type<scalar_t>>& s1, const std::vector<at::opmath_type<scalar_t>>& s2) {
  using opmath_t = at::opmath_type<scalar_t>;
  const BatchNormLayout& g = a.layout;
  const int64_t N = g.N, C = g.C, L = g.L, G = a.groups, D = C / G;
  const opmath_t* mean = a.mean.const_data_ptr<opmath_t>();
  const opmath_t* rstd = a.rstd.const_data_ptr<opmath_t>();
  const opmath_t* w = a.weight.defined() ? a.weight.const_data_ptr<opmath_t>() : nullptr;
  scalar_t* dx = a.grad_input.mutable_data_ptr<scalar_t>();
  for_each_sample(N, [&](int64_t n) {
    const int64_t valid = pad ? count_valid(pad + n * L, L) : L;
    SampleCoefficients<opmath_t> k(C);
    for (int64_t j = 0; j < G; ++j) {
      group_gradient_coefficients(
          s1.data() + n * C + j * D, s2.data() + n * C + j * D, w ? w + j * D : nullptr, D, mean[n * G + j],
          rstd[n * G + j], opmath_t(valid * D), k.mean.data() + j * D, k.a.data() + j * D, k.b.data() + j * D,
          k.k0.data() + j * D);
    }
    affine_sample<ChannelAffine::kGradientSum, scalar_t>(g, n, dy, x, pad, k, dx);
  });
}

// Forward by (sample, group) blocks (by_blocks): the block's row moments,
// merged, its statistics, then its rows normalized while still in cache.
// Fills group[n * G + j], mean, rstd and the output.
template <typename scalar_t>
void forward_by_blocks(
    const GroupNormForwardArgs& a, const scalar_t* x, const MaskByte* pad, std::vector<Moments<MergeT>>& group) {
  using opmath_t = at::opmath_type<scalar_t>;
  using fVec = typename VecIO<scalar_t>::fVec;
  const BatchNormLayout& g = a.layout;
  const int64_t N = g.N, L = g.L, G = a.groups, D = g.C / G;
  std::optional<MaskLanes<opmath_t>> mask_lanes;
  if (pad) mask_lanes.emplace(pad, N, L);
  const MaskLanes<opmath_t>* lanes = mask_lanes ? &*mask_lanes : nullptr;
  opmath_t* mean = a.mean.mutable_data_ptr<opmath_t>();
  opmath_t* rstd = a.rstd.mutable_data_ptr<opmath_t>();
  const opmath_t* w = a.weight.defined() ? a.weight.const_data_ptr<opmath_t>() : nullptr;
  const opmath_t* bias = a.bias.defined() ? a.bias.const_data_ptr<opmath_t>() : nullptr;
  scalar_t* out = a.output.mutable_data_ptr<scalar_t>();
  with_streaming<scalar_t>(N * g.C * L, [&](auto streaming) {
    constexpr bool kStream = decltype(streaming)::value;
    at::parallel_for(0, N * G, row_grain(D * L), [&](int64_t begin, int64_t end) {
      // Locals, not reloaded through the captures after every row's stores (as affine_per_channel).
      const MaskLanes<opmath_t>* block_lanes = lanes;
      const scalar_t* block_x = x;
      scalar_t* block_out = out;
      for (int64_t block = begin; block < end; ++block) {
        const int64_t n = block / G, c0 = (block % G) * D;
        const int64_t count = block_lanes ? block_lanes->valid[n] : L;
        const scalar_t* xb = block_x + block * D * L;
        Moments<MergeT> acc;
        for (int64_t c = 0; c < D; ++c) acc.merge(plane_segment_moments(xb + c * L, block_lanes, n, 0, L, count, L));
        group[block] = acc;
        group_statistics(acc, a.eps, mean[block], rstd[block]);
        // Affine folded per channel: out = (x - mean) * (rstd * w) + bias
        const fVec mu(mean[block]);
        for (int64_t c = 0; c < D; ++c) {
          const ChannelCoefficients<opmath_t> coef{
              mu, fVec(0), fVec(w ? rstd[block] * w[c0 + c] : rstd[block]), fVec(bias ? bias[c0 + c] : opmath_t(0))};
          affine_plane_row<ChannelAffine::kNormalize, kStream>(
              block_lanes, n, L, coef, static_cast<const scalar_t*>(nullptr), xb + c * L, block_out + (block * D + c) * L);
        }
      }
      if constexpr (kStream) stream_fence();
    });
  });
}

// Backward by (sample, group) blocks (by_blocks): the block's rows' sums
// (kept in s1, s2 for the parameter gradients), then its input gradient
// while dy and x are still in cache.
template <typename scalar_t>
void backward_by_blocks(
    const GroupNormBackwardArgs& a, const scalar_t* dy, const scalar_t* x, const MaskByte* pad,
    std::vector<at::opmath_type<scalar_t>>& s1, std::vector<at::opmath_type<scalar_t>>& s2) {
  using opmath_t = at::opmath_type<scalar_t>;
  using fVec = typename VecIO<scalar_t>::fVec;
  const BatchNormLayout& g = a.layout;
  const int64_t N = g.N, C = g.C, L = g.L, G = a.groups, D = C / G;
  std::optional<MaskLanes<opmath_t>> mask_lanes;
  if (pad) mask_lanes.emplace(pad, N, L);
  const MaskLanes<opmath_t>* lanes = mask_lanes ? &*mask_lanes : nullptr;
  const opmath_t* mean = a.mean.const_data_ptr<opmath_t>();
  const opmath_t* rstd = a.rstd.const_data_ptr<opmath_t>();
  const opmath_t* w = a.weight.defined() ? a.weight.const_data_ptr<opmath_t>() : nullptr;
  scalar_t* dx = a.grad_input.defined() ? a.grad_input.mutable_data_ptr<scalar_t>() : nullptr;
  with_streaming<scalar_t>(dx ? N * C * L : 0, [&](auto streaming) {
    constexpr bool kStream = decltype(streaming)::value;
    at::parallel_for(0, N * G, row_grain(D * L), [&](int64_t begin, int64_t end) {
      SampleCoefficients<opmath_t> k(D);
      // Locals, not reloaded through the captures after every row's stores (as affine_per_channel).
      const MaskLanes<opmath_t>* block_lanes = lanes;
      const scalar_t *block_dy = dy, *block_x = x;
      scalar_t* block_dx = dx;
      for (int64_t block = begin; block < end; ++block) {
        const int64_t n = block / G, c0 = (block % G) * D, offset = block * D * L;
        const fVec mu(mean[block]);
        for (int64_t c = 0; c < D; ++c) {
          fVec v1(0), v2(0);
          plane_segment_grad_sums(block_dy + offset + c * L, block_x + offset + c * L, block_lanes, n, 0, L, L, mu, v1, v2);
          s1[n * C + c0 + c] = sum_lanes(v1);
          s2[n * C + c0 + c] = sum_lanes(v2);
        }
        if (!block_dx) continue;
        const int64_t valid = block_lanes ? block_lanes->valid[n] : L;
        group_gradient_coefficients(
            s1.data() + n * C + c0, s2.data() + n * C + c0, w ? w + c0 : nullptr, D, mean[block], rstd[block],
            opmath_t(valid * D), k.mean.data(), k.a.data(), k.b.data(), k.k0.data());
        for (int64_t c = 0; c < D; ++c) {
          affine_plane_row<ChannelAffine::kGradientSum, kStream>(
              block_lanes, n, L,
              channel_coefficients<ChannelAffine::kGradientSum>(k.mean.data(), k.a.data(), k.b.data(), k.k0.data(), c),
              block_dy + offset + c * L, block_x + offset + c * L, block_dx + offset + c * L);
        }
      }
      if constexpr (kStream) stream_fence();
    });
  });
}

}  // namespace

// ------------------------------------------------------------------ kernels

void group_norm_forward(const GroupNormForwardArgs& a) {
  const BatchNormLayout& g = a.layout;
  const MaskByte* pad = padding_bytes(a.padding_mask);
  const int64_t N = g.N, G = a.groups;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, a.input.scalar_type(), "masknorm_group_norm_forward", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    const scalar_t* x = a.input.const_data_ptr<scalar_t>();
    std::vector<Moments<MergeT>> group(N * G);
    if (by_blocks(g, G, 1, sizeof(scalar_t))) {
      forward_by_blocks<scalar_t>(a, x, pad, group);
    } else {
      forward_by_samples<scalar_t>(a, x, pad, group);
    }
    if (a.running_mean.defined()) {
      // Scalar math: running = (1 - momentum) * running + momentum * average
      // over samples with count >= 2 of (mean, M2 / (count - 1))
      opmath_t* running_mean = a.running_mean.mutable_data_ptr<opmath_t>();
      opmath_t* running_var = a.running_var.mutable_data_ptr<opmath_t>();
      for (int64_t j = 0; j < G; ++j) {
        double mean_sum = 0, var_sum = 0;
        int64_t samples = 0;
        for (int64_t n = 0; n < N; ++n) {
          const Moments<MergeT>& acc = group[n * G + j];
          if (acc.count < 2) continue;
          mean_sum += double(acc.mean);
          var_sum += double(acc.m2) / double(acc.count - 1);
          ++samples;
        }
        if (samples == 0) continue;
        running_mean[j] = opmath_t((1 - a.momentum) * double(running_mean[j]) + a.momentum * mean_sum / samples);
        running_var[j] = opmath_t((1 - a.momentum) * double(running_var[j]) + a.momentum * var_sum / samples);
      }
    }
  });
}

void group_norm_backward(const GroupNormBackwardArgs& a) {
  const BatchNormLayout& g = a.layout;
  const MaskByte* pad = padding_bytes(a.padding_mask);
  const int64_t N = g.N, C = g.C, G = a.groups, D = C / G;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, a.input.scalar_type(), "masknorm_group_norm_backward", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    const scalar_t* x = a.input.const_data_ptr<scalar_t>();
    const scalar_t* dy = a.grad_output.const_data_ptr<scalar_t>();
    const opmath_t* rstd = a.rstd.const_data_ptr<opmath_t>();
    // Per (sample, channel): s1 = sum(dy), s2 = sum(dy * (x - mean)) over valid positions.
    std::vector<opmath_t> s1(N * C, 0), s2(N * C, 0);
    const bool blocks = by_blocks(g, G, 2, sizeof(scalar_t));
    if (blocks) {
      backward_by_blocks<scalar_t>(a, dy, x, pad, s1, s2);  // and the input gradient
    } else {
      grad_sums_by_samples<scalar_t>(a, dy, x, pad, s1, s2);
    }
    // Parameter gradients, summed over samples in order (deterministic):
    //   grad_weight = sum s2 * rstd, grad_bias = sum s1
    if (a.grad_weight.defined() || a.grad_bias.defined()) {
      opmath_t* dw = a.grad_weight.defined() ? a.grad_weight.mutable_data_ptr<opmath_t>() : nullptr;
      opmath_t* db = a.grad_bias.defined() ? a.grad_bias.mutable_data_ptr<opmath_t>() : nullptr;
      for (int64_t c = 0; c < C; ++c) {
        opmath_t sw = 0, sb = 0;
        for (int64_t n = 0; n < N; ++n) {
          sw += s2[n * C + c] * rstd[n * G + c / D];
          sb += s1[n * C + c];
        }
        if (dw) dw[c] = sw;
        if (db) db[c] = sb;
      }
    }
    if (!blocks && a.grad_input.defined()) grad_input_by_samples<scalar_t>(a, dy, x, pad, s1, s2);
  });
}

}  // namespace masknorm::cpu
