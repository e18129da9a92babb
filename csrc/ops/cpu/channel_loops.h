// Per-channel loops over the batch-norm layouts (kernels.h: BatchNormLayout),
// shared by the CPU batch-norm and group-norm kernels: moments of the valid
// positions per channel, the backward sums, and one elementwise loop for the
// normalization and the input gradient (ChannelAffine). Group norm calls
// them once per sample (a layout with N = 1) with per-sample coefficients.
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

// Per-channel pairs of sums over rows of C contiguous channels (channels
// last): Terms (ShiftedTerms, GradTerms) gives a row's two terms per
// channel. Each valid row is read whole, in memory order, kGroupRows rows
// per pass over float sums of the C channels, which stay in L1; those are
// flushed into the thread's MergeT sums every kFloatSumRows rows (float sums
// of few terms), and the threads' sums are added in order into sum1 and
// sum2 ([C] each). (Blocks of channels summed in registers while a chunk's
// rows went by read each row in strips, a short stream per row: slower when
// rows are long (C = 1024), faster only where valid rows are scattered and
// come from memory, as the backward sums of a (N, C) batch with random
// padded rows.)
constexpr int64_t kFloatSumRows = 64;
constexpr int kGroupRows = 8;

template <typename scalar_t, typename Terms>
void channel_row_sums(
    const MaskByte* pad, int64_t begin, int64_t end, int64_t C, const Terms& terms, MergeT* sum1, MergeT* sum2) {
  using IO = VecIO<scalar_t>;
  using opmath_t = typename IO::opmath_t;
  using fVec = typename IO::fVec;
  constexpr int64_t V = IO::size();
  PerThreadBuffers<opmath_t> partial(C, 2);
  PerThreadBuffers<MergeT> total(C, 2);
  at::parallel_for(begin, end, row_grain(C), [&](int64_t first, int64_t last) {
    opmath_t* p1 = partial.local(0);
    opmath_t* p2 = partial.local(1);
    MergeT* t1 = total.local(0);
    MergeT* t2 = total.local(1);
    int64_t rows[kGroupRows];
    int64_t grouped = 0, in_partial = 0;
    // Adds rows[from, from + kRows).
    const auto add_rows = [&](auto group, int64_t from) C10_ALWAYS_INLINE_ATTRIBUTE {
      constexpr int kRows = decltype(group)::value;
      vec_loop<V>(C, [&](int64_t c, int64_t w) C10_ALWAYS_INLINE_ATTRIBUTE {
        const fVec coef = terms.coefficients(c, w);
        fVec a = fVec::loadu(p1 + c, w), b = fVec::loadu(p2 + c, w);
        for (int j = 0; j < kRows; ++j) terms.add(rows[from + j], c, w, coef, a, b);
        a.store(p1 + c, w);
        b.store(p2 + c, w);
      });
      in_partial += kRows;
    };
    const auto flush = [&] {
      for (int64_t c = 0; c < C; ++c) {
        t1[c] += MergeT(p1[c]);
        t2[c] += MergeT(p2[c]);
        p1[c] = p2[c] = 0;
      }
      in_partial = 0;
    };
    for (int64_t r = first; r < last; ++r) {
      if (pad && pad[r] != 0) continue;
      rows[grouped++] = r;
      if (grouped < kGroupRows) continue;
      add_rows(std::integral_constant<int, kGroupRows>{}, 0);
      grouped = 0;
      if (in_partial >= kFloatSumRows) flush();
    }
    int64_t from = 0;  // the last rows: 4, 2 and 1 at a time
    if (grouped - from >= 4) add_rows(std::integral_constant<int, 4>{}, from), from += 4;
    if (grouped - from >= 2) add_rows(std::integral_constant<int, 2>{}, from), from += 2;
    if (grouped - from >= 1) add_rows(std::integral_constant<int, 1>{}, from);
    flush();
  });
  std::fill(sum1, sum1 + C, MergeT(0));
  std::fill(sum2, sum2 + C, MergeT(0));
  for (int64_t t = 0; t < total.threads(); ++t) {  // in order: the same result for a given thread count
    for (int64_t c = 0; c < C; ++c) {
      sum1[c] += total.of_thread(t, 0)[c];
      sum2[c] += total.of_thread(t, 1)[c];
    }
  }
}

// The terms of moments_channels_last: d = x - shift and d^2.
template <typename scalar_t>
struct ShiftedTerms {
  using IO = VecIO<scalar_t>;
  using fVec = typename IO::fVec;
  const scalar_t* x;
  int64_t C;
  const typename IO::opmath_t* shift;

  C10_ALWAYS_INLINE fVec coefficients(int64_t c, int64_t w) const { return fVec::loadu(shift + c, w); }
  C10_ALWAYS_INLINE void add(int64_t r, int64_t c, int64_t w, const fVec& s, fVec& ds, fVec& d2) const {
    // Scalar math: d = x - shift; ds += d; d2 += d * d   (tail lanes: 0 - 0)
    const fVec d = IO::load(x + r * C + c, w) - s;
    ds += d;
    d2 = at::vec::fmadd(d, d, d2);
  }
};

// Per-channel moments of rows of C channels, in one pass of sums of
// d = x - shift (channel_row_sums): M2 = sum d^2 - (sum d)^2 / k, with the
// shift the mean of the first kFloatSumRows rows from the first valid one,
// so the subtraction cancels little and data with a large offset keeps its
// variance. Where the shift is far out in the spread (shift_near_mean, as
// visited_moments' estimate), a second pass from the mean the first gives:
// the corrected two-pass algorithm.
// (out_t: the accumulation type, or MergeT for callers that merge the
// channels' moments further, as group norm does.)
template <typename scalar_t, typename out_t = at::opmath_type<scalar_t>>
void moments_channels_last(
    const scalar_t* x, const MaskByte* pad, int64_t rows, int64_t C, out_t* mean_out, out_t* m2_out) {
  using opmath_t = at::opmath_type<scalar_t>;
  if (C == 0) return;
  const int64_t count = count_valid(pad, rows);
  if (count == 0) {
    std::fill(mean_out, mean_out + C, out_t(0));
    std::fill(m2_out, m2_out + C, out_t(0));
    return;
  }
  int64_t first = 0;
  while (pad && pad[first] != 0) ++first;
  const int64_t first_end = std::min(rows, first + kFloatSumRows);
  std::vector<opmath_t> shift(static_cast<size_t>(C), opmath_t(0));
  std::vector<MergeT> ds(static_cast<size_t>(C)), d2(static_cast<size_t>(C));
  channel_row_sums<scalar_t>(pad, first, first_end, C, ShiftedTerms<scalar_t>{x, C, shift.data()}, ds.data(), d2.data());
  const MergeT first_count = MergeT(count_valid(pad ? pad + first : nullptr, first_end - first));
  for (int64_t c = 0; c < C; ++c) shift[c] = opmath_t(ds[c] / first_count);
  const MergeT k = MergeT(count);
  for (int pass = 0; pass < 2; ++pass) {
    channel_row_sums<scalar_t>(pad, 0, rows, C, ShiftedTerms<scalar_t>{x, C, shift.data()}, ds.data(), d2.data());
    bool shift_holds = true;
    for (int64_t c = 0; c < C; ++c) shift_holds = shift_holds && shift_near_mean(ds[c], d2[c], k);
    if (shift_holds || pass == 1) break;
    for (int64_t c = 0; c < C; ++c) shift[c] = opmath_t(MergeT(shift[c]) + ds[c] / k);
  }
  for (int64_t c = 0; c < C; ++c) {
    mean_out[c] = out_t(MergeT(shift[c]) + ds[c] / k);
    m2_out[c] = out_t(std::max(d2[c] - ds[c] * ds[c] / k, MergeT(0)));
  }
}

// Channels-first reductions split each (n, c) row of L into segments of at
// most this many positions, so that few long rows ((1, 8, 1M)) still keep
// every thread busy. A fixed length, not one derived from the thread count:
// the same segments, so the same result, for any number of threads.
constexpr int64_t kPlaneSegment = 16384;
// Positions of one channel summed by one part of the channels-first
// statistics and gradient sums: a chunk of short rows, in L1 with its dy.
constexpr int64_t kPlaneChunk = 4096;

inline int64_t plane_segments(int64_t L) { return std::max<int64_t>(1, (L + kPlaneSegment - 1) / kPlaneSegment); }

// Rows at least this long, of inputs of at least kPlaneStreamBytes, are
// parts of their own in the channels-first gradient sums, visited in memory
// order (PlaneChunks::kRowsInMemoryOrder). Smaller inputs stay in cache,
// where a part per row costs more in horizontal sums than it saves.
constexpr int64_t kPlaneRowMin = 128;
constexpr int64_t kPlaneStreamBytes = int64_t(4) << 20;

// The parts of the channels-first per-channel sums (statistics, gradient
// sums), each summed on its own and merged per channel in a fixed order
// (channel_parts), so the result is the same for any thread count:
//  - kChannelChunks: a part takes a chunk of one channel's rows (consecutive
//    n, about kPlaneChunk positions; short rows then share their horizontal
//    sums and index math), or a segment of one long row; parts are numbered
//    channel by channel.
//  - kRowsInMemoryOrder, for rows of kPlaneRowMin positions and more in
//    inputs of kPlaneStreamBytes and more (`bytes`, that of one input): a part
//    per row segment, numbered in memory order, so that each thread reads
//    its inputs as one stream. A channel's rows lie C * L apart: visited
//    channel by channel, the gradient sums' two inputs made dozens of short
//    streams, each row restarting the hardware prefetch. (The statistics
//    read one input and merge a row's moments at a higher cost per part:
//    they keep channel chunks.)
struct PlaneChunks {
  enum Order { kChannelChunks, kRowsInMemoryOrder };
  int64_t N, C, L, S, seg_len;
  bool by_row;  // kRowsInMemoryOrder taken
  int64_t chunk_rows, per_channel;

  PlaneChunks(int64_t N, int64_t C, int64_t L, Order order = kChannelChunks, int64_t bytes = 0)
      : N(N), C(C), L(L), S(plane_segments(L)), seg_len(std::min(L, kPlaneSegment)),
        by_row(order == kRowsInMemoryOrder && L >= kPlaneRowMin && bytes >= kPlaneStreamBytes),
        chunk_rows(by_row || S > 1 ? 1 : std::clamp<int64_t>(kPlaneChunk / std::max<int64_t>(L, 1), 1, std::max<int64_t>(N, 1))),
        per_channel((N + chunk_rows - 1) / chunk_rows * S) {}

  int64_t parts() const { return C * per_channel; }

  // Calls body(part, c, n0, n1, s, l0, len) for every part, in parallel:
  // rows n in [n0, n1) of channel c, positions [l0, l0 + len) (segment s).
  template <typename Body>
  void parallel(const Body& body) const {
    at::parallel_for(0, parts(), row_grain(chunk_rows * seg_len), [&](int64_t begin, int64_t end) {
      for (int64_t part = begin; part < end; ++part) {
        const int64_t s = part % S, l0 = s * seg_len, len = std::min(seg_len, L - l0);
        if (by_row) {  // part = (n * C + c) * S + s
          const int64_t row = part / S, n = row / C;
          body(part, row - n * C, n, n + 1, s, l0, len);
        } else {  // part = (c * chunks + chunk) * S + s
          const int64_t c = part / per_channel, n0 = (part % per_channel) / S * chunk_rows;
          body(part, c, n0, std::min(N, n0 + chunk_rows), s, l0, len);
        }
      }
    });
  }

  // Calls merge(part) for each of channel c's parts, in order (n, segment).
  template <typename Merge>
  void channel_parts(int64_t c, const Merge& merge) const {
    if (by_row) {
      for (int64_t n = 0; n < N; ++n) {
        for (int64_t s = 0; s < S; ++s) merge((n * C + c) * S + s);
      }
    } else {
      for (int64_t q = c * per_channel; q < (c + 1) * per_channel; ++q) merge(q);
    }
  }
};

// Valid positions per (n, segment) of an (N, L) mask, [n * S + s]; empty
// without a mask.
template <typename opmath_t>
std::vector<int64_t> segment_valid_counts(const MaskLanes<opmath_t>* lanes, int64_t N, int64_t L) {
  const int64_t S = plane_segments(L), seg_len = std::min(L, kPlaneSegment);
  std::vector<int64_t> valid(lanes ? static_cast<size_t>(N * S) : 0);
  for (int64_t n = 0; lanes && n < N; ++n) {
    for (int64_t s = 0; s < S; ++s) {
      const int64_t l0 = s * seg_len, len = std::min(seg_len, L - l0);
      valid[n * S + s] = S == 1 ? lanes->valid[n] : lanes->valid_within(n, l0, l0 + len);
    }
  }
  return valid;
}

// Moments of the valid positions of a plane row xr (sample n, length L)
// within [l0, l0 + len), `count` of them: run by run, or the segment at once
// under its lane masks (for_valid_spans), each by row_moments, merged in order.
template <typename scalar_t>
C10_ALWAYS_INLINE Moments<MergeT> plane_segment_moments(
    const scalar_t* xr, const MaskLanes<at::opmath_type<scalar_t>>* lanes, int64_t n, int64_t l0, int64_t len,
    int64_t count, int64_t L) {
  using opmath_t = at::opmath_type<scalar_t>;
  Moments<MergeT> m;
  if (count == 0) return m;
  for_valid_spans(lanes, n, l0, l0 + len, [&](int64_t b, int64_t e, const opmath_t* keep, int64_t) {
    // A span under lane masks is the whole segment, holding `count` valid positions.
    m.merge(row_moments<RowShift::kEstimate, scalar_t>(xr + b, keep ? keep + b : nullptr, e - b, keep ? count : e - b, L - b));
  });
  return m;
}

// Moments of every (n, c) row of (N, C, L) planes over its valid positions;
// [n * C + c]. The rows' segments are visited in memory order
// (prefetch-friendly), in parallel, and merged per row in order (in MergeT).
// Half types convert on load (cheaper than a float copy of the segment: one
// instruction more per vector, no store). Group and instance norm merge the
// rows per (sample, group); batch norm sums chunks of a channel's rows
// instead (moments_channels_first).
template <typename scalar_t>
std::vector<Moments<MergeT>> plane_row_moments(
    const scalar_t* x, const MaskLanes<at::opmath_type<scalar_t>>* lanes, int64_t N, int64_t C, int64_t L) {
  const int64_t S = plane_segments(L), seg_len = std::min(L, kPlaneSegment);
  const std::vector<int64_t> valid = segment_valid_counts(lanes, N, L);  // once for all channels
  std::vector<Moments<MergeT>> parts(static_cast<size_t>(N * C * S));
  at::parallel_for(0, N * C * S, row_grain(seg_len), [&](int64_t begin, int64_t end) {
    for (int64_t part = begin; part < end; ++part) {
      const int64_t row = part / S, s = part % S, n = row / C;
      const int64_t l0 = s * seg_len, len = std::min(seg_len, L - l0);
      parts[part] = plane_segment_moments(x + row * L, lanes, n, l0, len, lanes ? valid[n * S + s] : len, L);
    }
  });
  if (S == 1) return parts;
  std::vector<Moments<MergeT>> rows(static_cast<size_t>(N * C));
  for (int64_t row = 0; row < N * C; ++row) {
    for (int64_t s = 0; s < S; ++s) rows[row].merge(parts[row * S + s]);
  }
  return rows;
}

// Per-channel moments of (N, C, L) planes: each part (PlaneChunks) in one
// set of shifted sums (visited_moments), so short rows share the horizontal
// sums and the finishing divisions; the parts merge per channel in order
// (in MergeT).
template <typename scalar_t>
void moments_channels_first(
    const scalar_t* x, const MaskLanes<at::opmath_type<scalar_t>>* lanes, int64_t N, int64_t C,
    int64_t L, at::opmath_type<scalar_t>* mean_out, at::opmath_type<scalar_t>* m2_out) {
  using opmath_t = at::opmath_type<scalar_t>;
  const PlaneChunks chunks(N, C, L);
  const std::vector<int64_t> valid = segment_valid_counts(lanes, N, L);
  std::vector<Moments<MergeT>> parts(static_cast<size_t>(chunks.parts()));
  chunks.parallel([&](int64_t part, int64_t c, int64_t n0, int64_t n1, int64_t s, int64_t l0, int64_t len) {
    int64_t count = 0;
    for (int64_t n = n0; n < n1; ++n) count += lanes ? valid[n * chunks.S + s] : len;
    parts[part] = visited_moments<RowShift::kEstimate, scalar_t>(count, [&](const auto& add) {
      for (int64_t n = n0; n < n1; ++n) {
        const scalar_t* xr = x + (n * C + c) * L;
        for_valid_spans(lanes, n, l0, l0 + len, [&](int64_t b, int64_t e, const opmath_t* keep, int64_t) {
          add(xr + b, keep ? keep + b : nullptr, e - b, L - b);
        });
      }
    });
  });
  for (int64_t c = 0; c < C; ++c) {
    Moments<MergeT> acc;
    chunks.channel_parts(c, [&](int64_t q) { acc.merge(parts[q]); });
    mean_out[c] = opmath_t(acc.mean);
    m2_out[c] = opmath_t(acc.m2);
  }
}

// ------------------------------------------------------- backward reductions

// Adds to the vector sums s1 and s2 a plane row's dy (dyr) and dy * (x - m)
// (xr, m: its channel's mean) over the valid positions of sample n within
// [l0, l0 + len) (for_valid_spans). A span of kPlaneRowMin positions or
// more goes through four pairs of accumulators, folded into s1 and s2 at its
// end: four independent add and FMA chains in flight (with one pair, each
// vector waited for the previous one's add). Shorter spans add to s1 and s2
// directly: the fold would cost more than the chains save.
template <typename scalar_t>
C10_ALWAYS_INLINE void plane_segment_grad_sums(
    const scalar_t* dyr, const scalar_t* xr, const MaskLanes<at::opmath_type<scalar_t>>* lanes, int64_t n,
    int64_t l0, int64_t len, int64_t L, const typename VecIO<scalar_t>::fVec& m, typename VecIO<scalar_t>::fVec& s1,
    typename VecIO<scalar_t>::fVec& s2) {
  using IO = VecIO<scalar_t>;
  using opmath_t = typename IO::opmath_t;
  using fVec = typename IO::fVec;
  constexpr int64_t V = IO::size();
  if (lanes && lanes->valid[n] == 0) return;
  for_valid_spans(lanes, n, l0, l0 + len, [&](int64_t b, int64_t e, const opmath_t* keep, int64_t) {
    // Scalar math: if valid: s1 += dy; s2 += dy * (x - mean)
    // (in the chains both factors are cleared at padding: 0 * NaN is not 0)
    const auto step = [&](fVec& a1, fVec& a2, int64_t l, int64_t k) C10_ALWAYS_INLINE_ATTRIBUTE {
      fVec d = load_first(dyr + l, k, L - l);
      fVec xm = load_first(xr + l, k, L - l) - m;
      if (keep) {
        const fVec kv = fVec::loadu(keep + l, k);
        d = d & kv;
        xm = xm & kv;
      } else if (k < V) {
        xm = fVec::set(fVec(0), xm, k);  // tail lanes hold 0 - mean
      }
      a1 += d;
      a2 = at::vec::fmadd(d, xm, a2);
    };
    int64_t l = b;
    if (e - b >= kPlaneRowMin) {
      fVec a10(0), a11(0), a12(0), a13(0), a20(0), a21(0), a22(0), a23(0);
      for (; l + 4 * V <= e; l += 4 * V) {
        step(a10, a20, l, V);
        step(a11, a21, l + V, V);
        step(a12, a22, l + 2 * V, V);
        step(a13, a23, l + 3 * V, V);
      }
      s1 += (a10 + a11) + (a12 + a13);
      s2 += (a20 + a21) + (a22 + a23);
    }
    // The rest (a short span: all of it), vector by vector on s1 and s2, in
    // the loop's first form (through `step`, short rows ran slower).
    const fVec zero(0);
    vec_loop<V>(e - l, [&](int64_t i, int64_t k) {
      const int64_t p = l + i;
      fVec d = load_first(dyr + p, k, L - p);
      fVec dxm = d * (load_first(xr + p, k, L - p) - m);
      if (keep) {
        const fVec kv = fVec::loadu(keep + p, k);
        d = d & kv;
        dxm = dxm & kv;
      } else if (k < V) {
        dxm = fVec::set(zero, dxm, k);  // tail lanes hold 0 * (0 - mean)
      }
      s1 += d;
      s2 += dxm;
    });
  });
}

// The terms of the channels-last gradient sums: dy and dy * (x - mean).
template <typename scalar_t>
struct GradTerms {
  using IO = VecIO<scalar_t>;
  using fVec = typename IO::fVec;
  const scalar_t *dy, *x;
  int64_t C;
  const typename IO::opmath_t* mean;

  C10_ALWAYS_INLINE fVec coefficients(int64_t c, int64_t w) const { return fVec::loadu(mean + c, w); }
  C10_ALWAYS_INLINE void add(int64_t r, int64_t c, int64_t w, const fVec& m, fVec& s1, fVec& s2) const {
    // Scalar math: s1 += dy; s2 += dy * (x - mean)   (tail lanes: 0 * (0 - 0))
    const fVec d = IO::load(dy + r * C + c, w);
    s1 += d;
    s2 = at::vec::fmadd(d, IO::load(x + r * C + c, w) - m, s2);
  }
};

// Per channel over valid positions: sum(dy) and sum(dy * (x - mean)).
template <typename scalar_t>
void grad_sums(
    const BatchNormLayout& g, const scalar_t* dy, const scalar_t* x, const MaskByte* pad,
    const MaskLanes<at::opmath_type<scalar_t>>* lanes, const at::opmath_type<scalar_t>* mean,
    at::opmath_type<scalar_t>* sum_dy, at::opmath_type<scalar_t>* sum_dy_xmu) {
  using IO = VecIO<scalar_t>;
  using opmath_t = typename IO::opmath_t;
  using fVec = typename IO::fVec;
  const int64_t C = g.C;
  if (g.channels_last) {
    std::vector<MergeT> s1(static_cast<size_t>(C)), s2(static_cast<size_t>(C));
    channel_row_sums<scalar_t>(pad, 0, g.positions(), C, GradTerms<scalar_t>{dy, x, C, mean}, s1.data(), s2.data());
    for (int64_t c = 0; c < C; ++c) {
      sum_dy[c] = opmath_t(s1[c]);
      sum_dy_xmu[c] = opmath_t(s2[c]);
    }
    return;
  }
  // Channels first: one set of vector sums per part (PlaneChunks), added per
  // channel in order.
  const PlaneChunks chunks(g.N, C, g.L, PlaneChunks::kRowsInMemoryOrder, g.positions() * C * int64_t(sizeof(scalar_t)));
  const int64_t L = g.L;
  std::vector<opmath_t> parts(static_cast<size_t>(chunks.parts() * 2), opmath_t(0));
  chunks.parallel([&](int64_t part, int64_t c, int64_t n0, int64_t n1, int64_t, int64_t l0, int64_t len) {
    const fVec m(mean[c]);
    fVec s1(0), s2(0);
    for (int64_t n = n0; n < n1; ++n) {
      plane_segment_grad_sums(dy + (n * C + c) * L, x + (n * C + c) * L, lanes, n, l0, len, L, m, s1, s2);
    }
    parts[part * 2] = sum_lanes(s1);
    parts[part * 2 + 1] = sum_lanes(s2);
  });
  for (int64_t c = 0; c < C; ++c) {
    opmath_t s1 = 0, s2 = 0;
    chunks.channel_parts(c, [&](int64_t q) {
      s1 += parts[q * 2];
      s2 += parts[q * 2 + 1];
    });
    sum_dy[c] = s1;
    sum_dy_xmu[c] = s2;
  }
}

// ----------------------------------------------- elementwise (fwd and bwd)

// What affine_per_channel writes at valid positions (0 at padding), with
// per-channel a, b, k:
enum class ChannelAffine {
  kNormalize,     // (x - mean) * b + k: the normalization (b = alpha, k = beta; dy, a unused)
  kGradient,      // (dy + k) * a + (x - mean) * b: the input gradient with batch
                  // statistics, k = -sum_dy / n (dy + k is exactly 0 where dy is
                  // the channel's only value; a * dy - a * dy through an FMA is not)
  kGradientOfDy,  // dy * a: the input gradient with given statistics (x, mean, b
                  // and k are not read, so inf/NaN in them cannot reach it)
  kGradientSum,   // dy * a + (x - mean) * b + k: an input gradient whose k is no
                  // multiple of a (group norm: a varies within the group)
};

// The formulas of ChannelAffine, from the loaded values (xm = x - mean).
template <ChannelAffine kTerms, typename fVec>
C10_ALWAYS_INLINE fVec affine_value(const fVec& dy, const fVec& xm, const fVec& a, const fVec& b, const fVec& k) {
  if constexpr (kTerms == ChannelAffine::kNormalize) return at::vec::fmadd(xm, b, k);
  else if constexpr (kTerms == ChannelAffine::kGradient) return at::vec::fmadd(xm, b, (dy + k) * a);
  else if constexpr (kTerms == ChannelAffine::kGradientSum) return at::vec::fmadd(dy, a, at::vec::fmadd(xm, b, k));
  else return dy * a;
}

// A row's coefficients: one channel's, broadcast along a channels-first row,
// or each channel's own along a channels-last row (arrays indexed by lane).
template <typename opmath_t>
struct ChannelCoefficients {
  using fVec = Vectorized<opmath_t>;
  fVec mean, a, b, k;
  C10_ALWAYS_INLINE fVec mean_at(int64_t, int64_t) const { return mean; }
  C10_ALWAYS_INLINE fVec a_at(int64_t, int64_t) const { return a; }
  C10_ALWAYS_INLINE fVec b_at(int64_t, int64_t) const { return b; }
  C10_ALWAYS_INLINE fVec k_at(int64_t, int64_t) const { return k; }
};
template <typename opmath_t>
struct ChannelArrays {
  using fVec = Vectorized<opmath_t>;
  const opmath_t *mean, *a, *b, *k;
  C10_ALWAYS_INLINE fVec mean_at(int64_t i, int64_t w) const { return fVec::loadu(mean + i, w); }
  C10_ALWAYS_INLINE fVec a_at(int64_t i, int64_t w) const { return fVec::loadu(a + i, w); }
  C10_ALWAYS_INLINE fVec b_at(int64_t i, int64_t w) const { return fVec::loadu(b + i, w); }
  C10_ALWAYS_INLINE fVec k_at(int64_t i, int64_t w) const { return fVec::loadu(k + i, w); }
};

// One contiguous span of affine_per_channel: out = the formula at the `len`
// positions, cleared where `keep` (lane masks, or nullptr) says padding.
// Its pointers and coefficients are locals (parameters): captured by
// reference from parallel_for's lambda, they would be reloaded after every
// vector store (which may alias anything).
// `room` >= len: positions that may be read and written from the span's
// start (up to the next span or the row's end); a span ending in padding ends in a whole
// vector, its lanes past the span written as 0. Returns the positions
// written.
template <ChannelAffine kTerms, bool kStream, typename scalar_t, typename Coefficients>
C10_ALWAYS_INLINE int64_t affine_span(
    const scalar_t* dy, const scalar_t* x, const at::opmath_type<scalar_t>* keep, int64_t len, int64_t room,
    const Coefficients coef, scalar_t* out) {
  using IO = VecIO<scalar_t>;
  using fVec = typename IO::fVec;
  constexpr int64_t V = IO::size();
  constexpr bool kReadsX = kTerms != ChannelAffine::kGradientOfDy;  // and mean, b, k
  constexpr bool kReadsDy = kTerms != ChannelAffine::kNormalize;    // and a
  const auto value = [&](int64_t i, int64_t w) {
    const fVec zero(0);
    const fVec dyv = kReadsDy ? IO::load(dy + i, w) : zero;
    const fVec xm = kReadsX ? IO::load(x + i, w) - coef.mean_at(i, w) : zero;
    const fVec av = kReadsDy ? coef.a_at(i, w) : zero;
    const fVec bv = kReadsX ? coef.b_at(i, w) : zero;
    const fVec kv = kReadsX ? coef.k_at(i, w) : zero;
    fVec v = affine_value<kTerms>(dyv, xm, av, bv, kv);
    return keep ? v & fVec::loadu(keep + i, w) : v;
  };
  bool stream = false;
  if constexpr (kStream) stream = StreamIO<scalar_t>::aligned(out);
  const auto put = [&](int64_t at, const fVec& v) { store_row_vector<kStream>(out + at, v, V, stream); };
  int64_t i = 0;
  if constexpr (!std::is_same_v<scalar_t, at::opmath_type<scalar_t>>) {
    // Half types (never streamed): two vectors per store, as one vector's
    // pack and half-register store cost about what two vectors' do.
    for (; i + 2 * V <= len; i += 2 * V) IO::store_pair(out + i, value(i, V), value(i + V, V));
  }
  for (; i + V <= len; i += V) put(i, value(i, V));
  if (i == len) return len;
  if (i + V <= room) {  // a whole vector, the lanes past the span cleared (blend: NaN there cannot stay)
    put(i, fVec::set(fVec(0), value(i, V), len - i));
    return i + V;
  }
  IO::store(out + i, value(i, len - i), len - i);
  return len;
}

// Channel c's coefficients, broadcast along its plane rows (those that
// kTerms does not read are 0: never loaded).
template <ChannelAffine kTerms, typename opmath_t>
C10_ALWAYS_INLINE ChannelCoefficients<opmath_t> channel_coefficients(
    const opmath_t* mean, const opmath_t* a, const opmath_t* b, const opmath_t* k, int64_t c) {
  using fVec = Vectorized<opmath_t>;
  constexpr bool kReadsX = kTerms != ChannelAffine::kGradientOfDy;
  constexpr bool kReadsDy = kTerms != ChannelAffine::kNormalize;
  return {fVec(kReadsX ? mean[c] : opmath_t(0)), fVec(kReadsDy ? a[c] : opmath_t(0)),
          fVec(kReadsX ? b[c] : opmath_t(0)), fVec(kReadsX ? k[c] : opmath_t(0))};
}

// affine_per_channel over one plane row of sample n: out_row[0, L) = the
// formula at valid positions, 0 at padding, each position written once, in
// order (dy_row / x_row: nullptr where kTerms does not read them).
template <ChannelAffine kTerms, bool kStream, typename scalar_t>
C10_ALWAYS_INLINE void affine_plane_row(
    const MaskLanes<at::opmath_type<scalar_t>>* lanes, int64_t n, int64_t L,
    const ChannelCoefficients<at::opmath_type<scalar_t>>& coef, const scalar_t* dy_row, const scalar_t* x_row,
    scalar_t* out_row) {
  using opmath_t = at::opmath_type<scalar_t>;
  if (lanes && lanes->valid[n] == 0) return zero_span<kStream>(out_row, L);
  // Zeros out_row[from, to), padding; its inputs are read (and discarded)
  // where it is short (kReadThroughBytes), as the next plane row follows.
  const auto clear = [&](int64_t from, int64_t to) C10_ALWAYS_INLINE_ATTRIBUTE {
    if ((to - from) * int64_t(sizeof(scalar_t)) < kReadThroughBytes) {
      if (x_row) touch_lines(x_row + from, to - from);
      if (dy_row) touch_lines(dy_row + from, to - from);
    }
    zero_span<kStream>(out_row + from, to - from);
  };
  int64_t written = 0;  // out_row[0, written) is done
  // Inlined at each of for_valid_spans' calls: as a call per row, its
  // arguments and coefficients would go through the stack.
  for_valid_spans(lanes, n, 0, L, [&](int64_t b0, int64_t e0, const opmath_t* keep, int64_t next)
                                      C10_ALWAYS_INLINE_ATTRIBUTE {
    clear(written, b0);
    // Up to the next span: its positions are written once, in order.
    written = b0 + affine_span<kTerms, kStream>(
        dy_row ? dy_row + b0 : nullptr, x_row ? x_row + b0 : nullptr, keep ? keep + b0 : nullptr, e0 - b0,
        next - b0, coef, out_row + b0);
  });
  clear(written, L);
}

// One loop for the normalization and the input gradient, so all stages see
// the same traversal of both layouts. Padded positions are written as 0;
// channels-first rows read only their valid runs where the mask has few
// (for_valid_spans). Outputs of kStreamingBytes and more are written with
// streaming stores.
template <ChannelAffine kTerms, typename scalar_t>
void affine_per_channel(
    const BatchNormLayout& g, const scalar_t* dy, const scalar_t* x, const MaskByte* pad,
    const MaskLanes<at::opmath_type<scalar_t>>* lanes, const at::opmath_type<scalar_t>* mean,
    const at::opmath_type<scalar_t>* a, const at::opmath_type<scalar_t>* b,
    const at::opmath_type<scalar_t>* k, scalar_t* out) {
  using opmath_t = at::opmath_type<scalar_t>;
  constexpr bool kReadsX = kTerms != ChannelAffine::kGradientOfDy;
  constexpr bool kReadsDy = kTerms != ChannelAffine::kNormalize;
  const int64_t C = g.C, L = g.L;
  const auto run = [&](auto streaming) {
    constexpr bool kStream = decltype(streaming)::value;
    if (g.channels_last) {
      const ChannelArrays<opmath_t> coef{mean, a, b, k};
      at::parallel_for(0, g.positions(), row_grain(C), [&](int64_t begin, int64_t end) {
        for (int64_t r = begin; r < end; ++r) {
          if (pad && pad[r] != 0) { zero_span<kStream>(out + r * C, C); continue; }
          affine_span<kTerms, kStream>(
              kReadsDy ? dy + r * C : nullptr, kReadsX ? x + r * C : nullptr, static_cast<const opmath_t*>(nullptr),
              C, C, coef, out + r * C);
        }
        if constexpr (kStream) stream_fence();
      });
      return;
    }
    at::parallel_for(0, g.N * C, row_grain(L), [&](int64_t begin, int64_t end) {
      // The arguments as locals: captured by reference, each was reloaded
      // through the capture after every row's stores (which may alias).
      const auto* row_lanes = lanes;
      const opmath_t *row_mean = mean, *row_a = a, *row_b = b, *row_k = k;
      const scalar_t *row_dy = dy, *row_x = x;
      scalar_t* row_out = out;
      const int64_t row_C = C, row_L = L;
      // plane = n * C + c, stepped without a division per plane (rows may be short)
      for (int64_t plane = begin, n = begin / row_C, c = begin % row_C; plane < end; ++plane, ++c) {
        if (c == row_C) { c = 0; ++n; }
        affine_plane_row<kTerms, kStream>(
            row_lanes, n, row_L, channel_coefficients<kTerms>(row_mean, row_a, row_b, row_k, c),
            kReadsDy ? row_dy + plane * row_L : nullptr, kReadsX ? row_x + plane * row_L : nullptr,
            row_out + plane * row_L);
      }
      if constexpr (kStream) stream_fence();
    });
  };
  with_streaming<scalar_t>(g.N * C * L, run);
}

}  // namespace masknorm::cpu
