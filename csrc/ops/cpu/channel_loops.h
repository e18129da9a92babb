// Per-channel loops over the batch-norm layouts (kernels.h: BatchNormLayout),
// shared by the CPU batch-norm and group-norm kernels: moments of the valid
// positions per channel, the backward sums, and one elementwise loop
// out = dy * a + (x - mean) * b + k0 for the normalization and the input
// gradient. Group norm calls them once per sample (a layout with N = 1) with
// per-sample coefficients.
// Neighbours: batch_norm_kernel.cpp, group_norm_kernel.cpp (the kernels),
// norm_utils.h (vector I/O, mask lanes, row moments).
#pragma once

#include "norm_utils.h"

#include "../kernels.h"

#include <algorithm>
#include <optional>
#include <type_traits>

namespace masknorm::cpu {

// ---------------------------------------------------------------- statistics

// The two passes of moments_channels_inner over one chunk's valid rows
// [first, last), for a block of NV vectors of channels from c0 (the last
// vector holding `last_lanes` lanes): accumulators stay in registers while
// the rows go by (the chunk is in cache), and are stored once.
template <typename scalar_t, int NV>
struct ChunkColumns {
  using IO = VecIO<scalar_t>;
  using opmath_t = typename IO::opmath_t;
  using fVec = typename IO::fVec;
  static constexpr int64_t V = IO::size();

  static C10_ALWAYS_INLINE fVec load(const scalar_t* p, int j, int64_t last_lanes) {
    return j + 1 < NV ? IO::load(p + j * V) : IO::load(p + j * V, last_lanes);
  }
  static C10_ALWAYS_INLINE void store(opmath_t* p, const fVec& v, int j, int64_t last_lanes) {
    v.store(p + j * V, j + 1 < NV ? V : last_lanes);
  }

  // sum[c] = sum of x over the valid rows.
  static void sums(
      const scalar_t* x, const MaskByte* pad, int64_t first, int64_t last, int64_t C, int64_t c0,
      int64_t last_lanes, opmath_t* sum) {
    fVec s[NV];
    for (int j = 0; j < NV; ++j) s[j] = fVec(0);
    for (int64_t r = first; r < last; ++r) {
      if (pad && pad[r] != 0) continue;
      const scalar_t* xr = x + r * C + c0;
      for (int j = 0; j < NV; ++j) s[j] += load(xr, j, last_lanes);
    }
    for (int j = 0; j < NV; ++j) store(sum + c0, s[j], j, last_lanes);
  }

  // With d = x - mean over the valid rows: dsum[c] = sum d, m2[c] = sum d^2.
  static void deviations(
      const scalar_t* x, const MaskByte* pad, int64_t first, int64_t last, int64_t C, int64_t c0,
      int64_t last_lanes, const opmath_t* mean, opmath_t* dsum, opmath_t* m2) {
    fVec m[NV], ds[NV], d2[NV];
    for (int j = 0; j < NV; ++j) {
      m[j] = j + 1 < NV ? fVec::loadu(mean + c0 + j * V) : fVec::loadu(mean + c0 + j * V, last_lanes);
      ds[j] = fVec(0);
      d2[j] = fVec(0);
    }
    for (int64_t r = first; r < last; ++r) {
      if (pad && pad[r] != 0) continue;
      const scalar_t* xr = x + r * C + c0;
      for (int j = 0; j < NV; ++j) {
        // Scalar math: d = x - mean; dsum += d; m2 += d * d   (tail lanes: 0 - 0)
        const fVec d = load(xr, j, last_lanes) - m[j];
        ds[j] += d;
        d2[j] = at::vec::fmadd(d, d, d2[j]);
      }
    }
    for (int j = 0; j < NV; ++j) {
      store(dsum + c0, ds[j], j, last_lanes);
      store(m2 + c0, d2[j], j, last_lanes);
    }
  }
};

// Runs block(std::integral_constant<int, NV>, c0, last_lanes) over the C
// channels in blocks of 4, 2 and 1 vectors (independent accumulators, more
// in flight), the last one partial.
template <int64_t V, typename Block>
C10_ALWAYS_INLINE void column_blocks(int64_t C, const Block& block) {
  int64_t c = 0;
  for (; c + 4 * V <= C; c += 4 * V) block(std::integral_constant<int, 4>{}, c, V);
  for (; c + 2 * V <= C; c += 2 * V) block(std::integral_constant<int, 2>{}, c, V);
  for (; c < C; c += V) block(std::integral_constant<int, 1>{}, c, std::min(V, C - c));
}

// Per-channel moments of rows of C channels. Rows are taken in chunks small
// enough to stay in L2: a corrected two-pass over each chunk, vectorized over
// channels in the accumulation type (the chunk's mean, then the deviations
// from it and their squares: M2 = sum d^2 - (sum d)^2 / k, so the first
// pass's rounding leaves no bias), merged into the thread's running moments
// in MergeT with Chan's formula. Far fewer operations per element than a
// per-row Welford update, and as accurate as the float mean allows on data
// with a large offset. (Half
// types convert in both passes: a float copy of the chunk for the second
// pass costs more traffic than it saves conversions.)
// (out_t: the accumulation type, or MergeT for callers that merge the
// channels' moments further, as group norm does.)
template <typename scalar_t, typename out_t = at::opmath_type<scalar_t>>
void moments_channels_inner(
    const scalar_t* x, const MaskByte* pad, int64_t rows, int64_t C, out_t* mean_out, out_t* m2_out) {
  using IO = VecIO<scalar_t>;
  using opmath_t = typename IO::opmath_t;
  using fVec = typename IO::fVec;
  constexpr int64_t V = IO::size();
  if (C == 0) return;  // nothing to compute (and no chunk size: it divides by C)
  // Chunks of at most 64 rows: float sums of at most 64 terms (their rounding
  // error grows with the count), merged in MergeT; and small enough to stay in L2.
  const int64_t chunk_rows = std::clamp<int64_t>((256 * 1024) / (C * int64_t(sizeof(scalar_t))), 1, 64);
  // Per thread: the current chunk's mean, sum of deviations and of their squares;
  // the thread's running mean and M2 (MergeT).
  PerThreadBuffers<opmath_t> chunk(C, 3);
  PerThreadBuffers<MergeT> running(C, 2);
  std::vector<int64_t> seen(chunk.threads(), 0);
  at::parallel_for(0, rows, row_grain(C), [&](int64_t begin, int64_t end) {
    opmath_t* chunk_mean = chunk.local(0);
    opmath_t* chunk_dsum = chunk.local(1);
    opmath_t* chunk_m2 = chunk.local(2);
    MergeT* mean = running.local(0);
    MergeT* m2 = running.local(1);
    int64_t& n = seen[at::get_thread_num()];
    for (int64_t first = begin; first < end; first += chunk_rows) {
      const int64_t last = std::min(end, first + chunk_rows);
      const int64_t k = pad ? count_valid(pad + first, last - first) : last - first;
      if (k == 0) continue;
      column_blocks<V>(C, [&](auto nv, int64_t c0, int64_t lanes) {
        ChunkColumns<scalar_t, decltype(nv)::value>::sums(x, pad, first, last, C, c0, lanes, chunk_mean);
      });
      const fVec inv_k(opmath_t(1) / opmath_t(k));
      vec_loop<V>(C, [&](int64_t c, int64_t w) { (fVec::loadu(chunk_mean + c, w) * inv_k).store(chunk_mean + c, w); });
      column_blocks<V>(C, [&](auto nv, int64_t c0, int64_t lanes) {
        ChunkColumns<scalar_t, decltype(nv)::value>::deviations(
            x, pad, first, last, C, c0, lanes, chunk_mean, chunk_dsum, chunk_m2);
      });
      // Scalar math (MergeT): the chunk's corrected moments
      //   cm = chunk_mean + dsum / k; cm2 = chunk_m2 - dsum^2 / k
      // merged into the thread's (Chan): delta = cm - mean; f = k / (n + k);
      //   mean += delta * f; m2 += cm2 + delta^2 * n * f
      const MergeT kd = MergeT(k), f = kd / MergeT(n + k), nf = MergeT(n) * f;
      for (int64_t c = 0; c < C; ++c) {
        const MergeT ds = chunk_dsum[c];
        const MergeT cm = MergeT(chunk_mean[c]) + ds / kd;
        const MergeT cm2 = std::max(MergeT(chunk_m2[c]) - ds * ds / kd, MergeT(0));
        const MergeT delta = cm - mean[c];
        mean[c] += delta * f;
        m2[c] += cm2 + delta * delta * nf;
      }
      n += k;
    }
  });
  for (int64_t c = 0; c < C; ++c) {
    Moments<MergeT> acc;  // threads in order: the same result for a given thread count
    for (int64_t t = 0; t < chunk.threads(); ++t) {
      acc.merge({seen[t], running.of_thread(t, 0)[c], running.of_thread(t, 1)[c]});
    }
    mean_out[c] = out_t(acc.mean);
    m2_out[c] = out_t(acc.m2);
  }
}

// Moments of every (n, c) row of (N, C, L) planes over its valid positions,
// visited in memory order (prefetch-friendly); [n * C + c]. Half types
// convert each row once (RowScratch) for its two passes. Batch norm merges
// them per channel, group and instance norm per (sample, group).
template <typename scalar_t>
std::vector<Moments<MergeT>> plane_row_moments(
    const scalar_t* x, const MaskLanes<at::opmath_type<scalar_t>>* lanes, int64_t N, int64_t C, int64_t L) {
  using opmath_t = at::opmath_type<scalar_t>;
  std::vector<Moments<MergeT>> rows(static_cast<size_t>(N * C));
  at::parallel_for(0, N * C, row_grain(L), [&](int64_t begin, int64_t end) {
    RowScratch<scalar_t> scratch(L);
    for (int64_t row = begin; row < end; ++row) {
      const int64_t n = row / C;
      const int64_t valid = lanes ? lanes->valid[n] : L;
      if (valid == 0) continue;
      rows[row] = row_moments<opmath_t>(
          scratch.as_opmath(x + row * L, L), lanes ? lanes->keep.data() + n * L : nullptr, L, valid);
    }
  });
  return rows;
}

// Per-channel moments of (N, C, L) planes: the rows' moments merged per
// channel in order of n (in MergeT), the same result for any thread count.
template <typename scalar_t>
void moments_channels_outer(
    const scalar_t* x, const MaskLanes<at::opmath_type<scalar_t>>* lanes, int64_t N, int64_t C,
    int64_t L, at::opmath_type<scalar_t>* mean_out, at::opmath_type<scalar_t>* m2_out) {
  using opmath_t = at::opmath_type<scalar_t>;
  const std::vector<Moments<MergeT>> rows = plane_row_moments(x, lanes, N, C, L);
  for (int64_t c = 0; c < C; ++c) {
    Moments<MergeT> acc;
    for (int64_t n = 0; n < N; ++n) acc.merge(rows[n * C + c]);
    mean_out[c] = opmath_t(acc.mean);
    m2_out[c] = opmath_t(acc.m2);
  }
}

// ------------------------------------------------------- backward reductions

// Per channel over valid positions: sum(dy) and sum(dy * (x - mean)).
template <typename scalar_t>
void grad_sums(
    const BatchNormLayout& g, const scalar_t* dy, const scalar_t* x, const MaskByte* pad,
    const MaskLanes<at::opmath_type<scalar_t>>* lanes, const at::opmath_type<scalar_t>* mean,
    at::opmath_type<scalar_t>* sum_dy, at::opmath_type<scalar_t>* sum_dy_xmu) {
  using IO = VecIO<scalar_t>;
  using opmath_t = typename IO::opmath_t;
  using fVec = typename IO::fVec;
  constexpr int64_t V = IO::size();
  const int64_t C = g.C;
  if (g.channels_inner) {
    PerThreadBuffers<opmath_t> partial(C, 2);
    at::parallel_for(0, g.rows(), row_grain(C), [&](int64_t begin, int64_t end) {
      opmath_t* s1 = partial.local(0);
      opmath_t* s2 = partial.local(1);
      for (int64_t r = begin; r < end; ++r) {
        if (pad && pad[r] != 0) continue;
        vec_loop<V>(C, [&](int64_t c, int64_t k) {
          // Scalar math: s1 += dy; s2 += dy * (x - mean)
          const fVec d = IO::load(dy + r * C + c, k);
          const fVec xm = IO::load(x + r * C + c, k) - fVec::loadu(mean + c, k);
          (fVec::loadu(s1 + c, k) + d).store(s1 + c, k);
          at::vec::fmadd(d, xm, fVec::loadu(s2 + c, k)).store(s2 + c, k);
        });
      }
    });
    partial.sum_into(sum_dy, 0);
    partial.sum_into(sum_dy_xmu, 1);
    return;
  }
  const int64_t L = g.L;
  const fVec zero(0);
  at::parallel_for(0, C, std::max<int64_t>(1, row_grain(g.N * L)), [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      fVec s1(0), s2(0);
      const fVec m(mean[c]);
      for (int64_t n = 0; n < g.N; ++n) {
        if (lanes && lanes->valid[n] == 0) continue;
        const auto* keep = lanes ? lanes->keep.data() + n * L : nullptr;
        const scalar_t* dyr = dy + (n * C + c) * L;
        const scalar_t* xr = x + (n * C + c) * L;
        vec_loop<V>(L, [&](int64_t l, int64_t k) {
          // Scalar math: if valid: s1 += dy; s2 += dy * (x - mean)
          fVec d = IO::load(dyr + l, k);
          fVec dxm = d * (IO::load(xr + l, k) - m);
          if (keep) {
            const fVec kv = fVec::loadu(keep + l, k);
            d = d & kv;
            dxm = dxm & kv;
          } else if (k < V) {
            dxm = fVec::set(zero, dxm, k);  // tail lanes hold 0 * (0 - mean)
          }
          s1 += d;
          s2 += dxm;
        });
      }
      sum_dy[c] = sum_lanes(s1);
      sum_dy_xmu[c] = sum_lanes(s2);
    }
  });
}

// ----------------------------------------------- elementwise (fwd and bwd)

// out = dy * a + (x - mean) * b + k0 at valid positions, 0 at padding, per
// channel: the normalization (kHasDy false: b = alpha, k0 = beta, no dy term)
// and the input gradient. One loop, so both stages see the same traversal of
// both layouts.
template <bool kHasDy, typename scalar_t>
void affine_per_channel(
    const BatchNormLayout& g, const scalar_t* dy, const scalar_t* x, const MaskByte* pad,
    const MaskLanes<at::opmath_type<scalar_t>>* lanes, const at::opmath_type<scalar_t>* mean,
    const at::opmath_type<scalar_t>* a, const at::opmath_type<scalar_t>* b,
    const at::opmath_type<scalar_t>* k0, scalar_t* out) {
  using IO = VecIO<scalar_t>;
  using fVec = typename IO::fVec;
  constexpr int64_t V = IO::size();
  const int64_t C = g.C;
  if (g.channels_inner) {
    at::parallel_for(0, g.rows(), row_grain(C), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        if (pad && pad[r] != 0) { fill_zero(out + r * C, C); continue; }
        vec_loop<V>(C, [&](int64_t c, int64_t k) {
          // Scalar math: out = dy * a + (x - mean) * b + k0
          fVec v = at::vec::fmadd(
              IO::load(x + r * C + c, k) - fVec::loadu(mean + c, k), fVec::loadu(b + c, k), fVec::loadu(k0 + c, k));
          if constexpr (kHasDy) v = at::vec::fmadd(IO::load(dy + r * C + c, k), fVec::loadu(a + c, k), v);
          IO::store(out + r * C + c, v, k);
        });
      }
    });
    return;
  }
  const int64_t L = g.L;
  at::parallel_for(0, g.N * C, row_grain(L), [&](int64_t begin, int64_t end) {
    for (int64_t plane = begin; plane < end; ++plane) {
      const int64_t n = plane / C, c = plane % C;
      if (lanes && lanes->valid[n] == 0) { fill_zero(out + plane * L, L); continue; }
      const auto* keep = lanes ? lanes->keep.data() + n * L : nullptr;
      const fVec m(mean[c]), bv(b[c]), kv(k0[c]);
      const fVec av(kHasDy ? a[c] : 0);
      vec_loop<V>(L, [&](int64_t l, int64_t k) {
        // Scalar math: out = valid ? dy * a + (x - mean) * b + k0 : 0
        fVec v = at::vec::fmadd(IO::load(x + plane * L + l, k) - m, bv, kv);
        if constexpr (kHasDy) v = at::vec::fmadd(IO::load(dy + plane * L + l, k), av, v);
        if (keep) v = v & fVec::loadu(keep + l, k);
        IO::store(out + plane * L + l, v, k);
      });
    }
  });
}

}  // namespace masknorm::cpu
