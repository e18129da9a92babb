// CPU loops of group norm (kernels.h: GroupNormForwardArgs,
// GroupNormBackwardArgs); instance norm is group norm with one group per
// channel. The op (../group_norm.cpp) has checked the arguments and prepared
// contiguous tensors and outputs.
//
// Group norm is batch norm of one sample at a time with the channels of a
// group pooled, so it runs batch norm's loops (channel_loops.h) per sample:
// the per-(sample, channel) moments are merged per (sample, group) with
// Chan's formula, and the normalization and input gradient are the one
// elementwise loop out = dy * a + (x - mean) * b + k0 with per-sample
// coefficients. Padded positions are skipped or cleared with a bit mask.
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

}  // namespace

// ------------------------------------------------------------------ kernels

void group_norm_forward(const GroupNormForwardArgs& a) {
  const BatchNormLayout& g = a.layout;
  const MaskByte* pad = mask_bytes(a.padding_mask);
  const int64_t N = g.N, C = g.C, G = a.groups, D = G > 0 ? C / G : 0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, a.input.scalar_type(), "masknorm_group_norm_forward", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    const scalar_t* x = a.input.const_data_ptr<scalar_t>();
    std::vector<MergeT> ch_mean, ch_m2;
    std::vector<int64_t> valid;
    channel_moments<scalar_t>(g, x, pad, ch_mean, ch_m2, valid);
    // Scalar math: per (sample, group), the channels' moments merged (Chan):
    //   mean, rstd = 1 / sqrt(M2 / count + eps); 0 without valid positions
    opmath_t* mean = a.mean.mutable_data_ptr<opmath_t>();
    opmath_t* rstd = a.rstd.mutable_data_ptr<opmath_t>();
    std::vector<Moments<MergeT>> group(N * G);
    for (int64_t n = 0; n < N; ++n) {
      for (int64_t j = 0; j < G; ++j) {
        Moments<MergeT>& acc = group[n * G + j];
        for (int64_t c = j * D; c < (j + 1) * D; ++c) acc.merge({valid[n], ch_mean[n * C + c], ch_m2[n * C + c]});
        mean[n * G + j] = opmath_t(acc.mean);
        rstd[n * G + j] = acc.count > 0 ? opmath_t(1 / std::sqrt(acc.m2 / MergeT(acc.count) + a.eps)) : opmath_t(0);
      }
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
  });
}

void group_norm_backward(const GroupNormBackwardArgs& a) {
  const BatchNormLayout& g = a.layout;
  const MaskByte* pad = mask_bytes(a.padding_mask);
  const int64_t N = g.N, C = g.C, L = g.L, G = a.groups, D = G > 0 ? C / G : 0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, a.input.scalar_type(), "masknorm_group_norm_backward", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    const scalar_t* x = a.input.const_data_ptr<scalar_t>();
    const scalar_t* dy = a.grad_output.const_data_ptr<scalar_t>();
    const opmath_t* mean = a.mean.const_data_ptr<opmath_t>();
    const opmath_t* rstd = a.rstd.const_data_ptr<opmath_t>();
    const opmath_t* w = a.weight.defined() ? a.weight.const_data_ptr<opmath_t>() : nullptr;
    // Per (sample, channel): s1 = sum(dy), s2 = sum(dy * (x - mean)) over valid positions.
    std::vector<opmath_t> s1(N * C, 0), s2(N * C, 0);
    std::vector<int64_t> valid(N, L);
    if (pad) {
      for (int64_t n = 0; n < N; ++n) valid[n] = count_valid(pad + n * L, L);
    }
    for_each_sample(N, [&](int64_t n) {
      if (valid[n] == 0) return;
      SampleCoefficients<opmath_t> k(C);
      for (int64_t c = 0; c < C; ++c) k.mean[c] = mean[n * G + c / D];
      const int64_t offset = n * C * L;
      const MaskByte* sample_pad = pad ? pad + n * L : nullptr;
      std::optional<MaskLanes<opmath_t>> lanes;
      if (sample_pad && !g.channels_last) lanes.emplace(sample_pad, 1, L);
      grad_sums<scalar_t>(
          sample_layout(g), dy + offset, x + offset, sample_pad, lanes ? &*lanes : nullptr, k.mean.data(),
          s1.data() + n * C, s2.data() + n * C);
    });
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
    if (!a.grad_input.defined()) return;
    scalar_t* dx = a.grad_input.mutable_data_ptr<scalar_t>();
    for_each_sample(N, [&](int64_t n) {
      // Scalar math, per group with k = valid * D, A = sum(w * dy), B = sum(w * dy * xhat):
      //   dx = dy * (w * rstd) + (x - mean) * (-rstd^2 * B / k) + (-rstd * A / k)
      SampleCoefficients<opmath_t> k(C);
      const opmath_t count = opmath_t(valid[n] * D);
      for (int64_t j = 0; j < G; ++j) {
        const opmath_t r = rstd[n * G + j];
        opmath_t A = 0, B = 0;
        for (int64_t c = j * D; c < (j + 1) * D; ++c) {
          const opmath_t wc = w ? w[c] : opmath_t(1);
          A += wc * s1[n * C + c];
          B += wc * s2[n * C + c] * r;
        }
        const opmath_t inv_k = count > 0 ? opmath_t(1) / count : opmath_t(0);
        for (int64_t c = j * D; c < (j + 1) * D; ++c) {
          k.mean[c] = mean[n * G + j];
          k.a[c] = w ? w[c] * r : r;
          k.b[c] = -r * r * B * inv_k;
          k.k0[c] = -r * A * inv_k;
        }
      }
      affine_sample<ChannelAffine::kGradientSum, scalar_t>(g, n, dy, x, pad, k, dx);
    });
  });
}

}  // namespace masknorm::cpu
