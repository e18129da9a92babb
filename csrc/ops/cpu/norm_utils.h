// Shared pieces of the CPU normalization kernels: vector load/store in the
// accumulation type, padding-mask helpers, and numerically stable moments.
#pragma once

#include "../arg_pointers.h"

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/bit_cast.h>
#include <c10/util/llvmMathExtras.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <limits>
#include <vector>

namespace masknorm::cpu {

using at::vec::Vectorized;

// Loads and stores `scalar_t` data as vectors of its accumulation type
// (float for float/half/bfloat16, double for double), `size()` lanes at a
// time, with a partial count for loop tails.
template <typename scalar_t>
struct VecIO {
  using opmath_t = at::opmath_type<scalar_t>;
  using fVec = Vectorized<opmath_t>;
  static constexpr int64_t size() { return fVec::size(); }

  static fVec load(const scalar_t* p, int64_t count = size()) {
    if constexpr (std::is_same_v<scalar_t, opmath_t>) {
      return fVec::loadu(p, count);
    } else if (count == size()) {
      // A half-width load converted once (a full Vectorized<scalar_t> holds
      // twice the lanes and would convert both halves).
      fVec out;
      at::vec::load_to_float<scalar_t>(p, out);
      return out;
    } else {
      auto packed = Vectorized<scalar_t>::loadu(p, count);
      return std::get<0>(at::vec::convert_to_float<scalar_t>(packed));
    }
  }

  static void store(scalar_t* p, const fVec& v, int64_t count = size()) {
    if constexpr (std::is_same_v<scalar_t, opmath_t>) {
      v.store(p, count);
    } else {
      at::vec::convert_from_float<scalar_t>(v, v).store(p, count);
    }
  }

  // 2 * size() lanes: v0 then v1. Half types convert the pair together and
  // store it whole (one pack and one full-register store for both).
  static C10_ALWAYS_INLINE void store_pair(scalar_t* p, const fVec& v0, const fVec& v1) {
    if constexpr (std::is_same_v<scalar_t, opmath_t>) {
      v0.store(p);
      v1.store(p + size());
    } else {
      at::vec::convert_from_float<scalar_t>(v0, v1).store(p);
    }
  }
};

// Streaming (non-temporal) stores, for outputs too large to stay in cache
// (kStreamingBytes and up): written to memory without first reading the
// lines they overwrite, as a plain store does, so an elementwise pass moves
// two thirds of the bytes. A whole vector at a time, at an address aligned
// to its size (aligned()); stream_fence() when a thread is done. float and
// double only (kStreams): half types store half a register per vector, and
// streaming those measured slower than plain stores (bf16 batch norm, AMD
// EPYC, AVX2). Builds without AVX2/AVX512 store plainly.
constexpr int64_t kStreamingBytes = int64_t(8) << 20;

template <typename scalar_t>
struct StreamIO {
  using fVec = typename VecIO<scalar_t>::fVec;
  static constexpr bool kStreams = std::is_same_v<scalar_t, float> || std::is_same_v<scalar_t, double>;

  static bool aligned(const scalar_t* p) { return reinterpret_cast<uintptr_t>(p) % sizeof(fVec) == 0; }

  static C10_ALWAYS_INLINE void store(scalar_t* p, const fVec& v) {
    static_assert(kStreams, "streaming stores are for float and double");
#if defined(CPU_CAPABILITY_AVX512)
    if constexpr (std::is_same_v<scalar_t, float>) _mm512_stream_ps(p, v);
    else _mm512_stream_pd(p, v);
#elif defined(CPU_CAPABILITY_AVX2)
    if constexpr (std::is_same_v<scalar_t, float>) _mm256_stream_ps(p, v);
    else _mm256_stream_pd(p, v);
#else
    v.store(p);
#endif
  }
};

inline void stream_fence() {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  _mm_sfence();
#endif
}

// A row of bfloat16/float16 values converted once to the accumulation type
// (a buffer per thread, reused row after row), so that the passes over the
// row read floats from cache instead of converting again. For float and
// double input the row itself is used.
template <typename scalar_t>
class RowScratch {
 public:
  using opmath_t = at::opmath_type<scalar_t>;
  static constexpr bool kConverts = !std::is_same_v<scalar_t, opmath_t>;

  explicit RowScratch(int64_t width) : buffer_(kConverts ? static_cast<size_t>(width) : 0) {}

  const opmath_t* as_opmath(const scalar_t* x, int64_t len) {
    if constexpr (!kConverts) {
      return x;
    } else {
      using IO = VecIO<scalar_t>;
      int64_t i = 0;
      for (; i + IO::size() <= len; i += IO::size()) IO::load(x + i).store(buffer_.data() + i);
      if (i < len) IO::load(x + i, len - i).store(buffer_.data() + i, len - i);
      return buffer_.data();
    }
  }

 private:
  std::vector<opmath_t> buffer_;
};

// A lane mask: all bits set where the element is valid, none where it is
// padding. `v & mask` clears padded lanes to +0.0 bit by bit, so NaN/inf
// stored there stays out of every sum (multiplying by 0 would not).
template <typename opmath_t>
inline opmath_t keep_bits(bool valid) {
  using bits_t = std::conditional_t<sizeof(opmath_t) == 8, uint64_t, uint32_t>;
  return c10::bit_cast<opmath_t>(valid ? ~bits_t(0) : bits_t(0));
}

// Count, mean and sum of squared deviations (M2) of a set of values.
// Statistics are merged in MergeT (double): a part's mean, rounded to float,
// is off by up to half an ulp, which on data with a large common offset is a
// sizeable fraction of the spread, and Chan's between-part term would carry
// it into the variance.
using MergeT = double;

// Chan et al.'s pairwise combination, the one merge of partial moments: the
// moments (mean, m2) of n values take in a part of k values (part_mean,
// part_m2), given the part's weight f = k / (n + k) and nf = n * f (callers
// merging many channels' parts of the same counts compute them once).
template <typename T>
C10_ALWAYS_INLINE void chan_merge(T& mean, T& m2, T part_mean, T part_m2, T f, T nf) {
  const T delta = part_mean - mean;
  mean += delta * f;
  m2 += part_m2 + delta * delta * nf;
}

template <typename opmath_t>
struct Moments {
  int64_t count = 0;
  opmath_t mean = 0;
  opmath_t m2 = 0;

  // Exact merge of two partial results (chan_merge).
  void merge(const Moments& other) {
    if (other.count == 0) return;
    if (count == 0) { *this = other; return; }
    const opmath_t f = opmath_t(other.count) / opmath_t(count + other.count);
    chan_merge(mean, m2, other.mean, other.m2, f, opmath_t(count) * f);
    count += other.count;
  }
};

// Runs body(offset, count) over [0, len) in steps of V: full steps with
// count == V, which the compiler sees as a constant once body is inlined (so
// loads and stores are plain vector moves), then one partial tail step.
template <int64_t V, typename Body>
C10_ALWAYS_INLINE void vec_loop(int64_t len, const Body& body) {
  int64_t i = 0;
  for (; i + V <= len; i += V) body(i, V);
  if (i < len) body(i, len - i);
}

// Sum of a vector's lanes. Rows are short, so this runs once or more per row:
// for float, at::vec's shuffle tree (log2(lanes) steps, not a serial chain).
template <typename opmath_t>
inline opmath_t sum_lanes(const Vectorized<opmath_t>& v) {
  if constexpr (std::is_same_v<opmath_t, float>) {
    return at::vec::vec_reduce_all<float>([](const auto& a, const auto& b) { return a + b; }, v);
  } else {
    __at_align__ opmath_t lanes[Vectorized<opmath_t>::size()];
    v.store(lanes);
    opmath_t sum = 0;
    for (const opmath_t lane : lanes) sum += lane;
    return sum;
  }
}

// Loads the `n` values at p (n <= V) as a vector with the other lanes 0.
// When a whole vector may be read there (room >= V: the row goes on past
// the run), a full load and a blend, not at::vec's partial load (a memcpy
// through the stack, costly when every run of a masked row ends in one).
template <typename scalar_t>
C10_ALWAYS_INLINE typename VecIO<scalar_t>::fVec load_first(const scalar_t* p, int64_t n, int64_t room) {
  using IO = VecIO<scalar_t>;
  using fVec = typename IO::fVec;
  if (n == IO::size()) return IO::load(p);
  if (room >= IO::size()) return fVec::set(fVec(0), IO::load(p), n);
  return IO::load(p, n);
}

// Where visited_moments takes the shift of its sums of d = x - shift from:
//  - kMean: the row's mean, from a first pass (the corrected two-pass
//    algorithm); for moments used as they are (LayerNorm rows).
//  - kEstimate: the mean of the valid lanes of the first vector (else the
//    first valid element): one pass, and the kMean passes only where the
//    estimate is far out in the spread (more than 3 bits would cancel:
//    sum(d)^2 / count > 7/8 sum(d^2)), the squares are subnormal or the
//    sums are not finite; for sums merged into per-channel or per-group
//    moments (batch norm's chunks of a channel's rows, group and instance
//    norm's rows). An estimate a quarter of a standard deviation off adds
//    about half an ulp to M2.
enum class RowShift { kMean, kEstimate };

// Sums of d = x - shift (and, kSquares, of d^2) over the valid lanes of
// spans added one by one, in vector accumulators (two pairs: independent add
// chains). Without a shift given, it is estimated from the first span with
// a valid element (RowShift::kEstimate): the mean of the valid lanes of its
// first vector, else its first valid element.
template <typename scalar_t, bool kSquares>
class ShiftedSums {
 public:
  using IO = VecIO<scalar_t>;
  using opmath_t = typename IO::opmath_t;
  using fVec = typename IO::fVec;
  static constexpr int64_t V = IO::size();

  ShiftedSums() = default;
  explicit ShiftedSums(opmath_t shift) : shift_(shift), shift_vec_(shift), has_shift_(true) {}

  // Adds the valid lanes of x[0, len): keep is their lane masks (keep_bits),
  // or nullptr when all are valid; room >= len elements may be read.
  C10_ALWAYS_INLINE void add(const scalar_t* x, const opmath_t* keep, int64_t len, int64_t room) {
    if (!has_shift_ && !estimate_shift(x, keep, len, room)) return;  // no valid element
    // Scalar math: ds += x - shift; d2 += (x - shift)^2
    // Locals, and the tail's body inlined: g++ stored accumulators that a
    // member or an out-of-line lambda's capture held after every step.
    const fVec shift = shift_vec_;
    fVec ds0 = ds0_, ds1 = ds1_, d20 = d20_, d21 = d21_;
    int64_t i = 0;
    for (; i + 2 * V <= len; i += 2 * V) {
      const fVec d0 = deviation(x, keep, i, V, room, shift), d1 = deviation(x, keep, i + V, V, room, shift);
      ds0 += d0;
      ds1 += d1;
      if constexpr (kSquares) {
        d20 = at::vec::fmadd(d0, d0, d20);
        d21 = at::vec::fmadd(d1, d1, d21);
      }
    }
    vec_loop<V>(len - i, [&](int64_t j, int64_t n) C10_ALWAYS_INLINE_ATTRIBUTE {
      const fVec d = deviation(x, keep, i + j, n, room, shift);
      ds0 += d;
      if constexpr (kSquares) d20 = at::vec::fmadd(d, d, d20);
    });
    ds0_ = ds0;
    ds1_ = ds1;
    d20_ = d20;
    d21_ = d21;
  }

  opmath_t shift() const { return shift_; }
  opmath_t sum() const { return sum_lanes(ds0_ + ds1_); }
  opmath_t sum_of_squares() const { return sum_lanes(d20_ + d21_); }

 private:
  // x[i, i + n) - shift on the valid lanes, 0 on the others.
  static C10_ALWAYS_INLINE fVec deviation(
      const scalar_t* x, const opmath_t* keep, int64_t i, int64_t n, int64_t room, const fVec& shift) {
    const fVec d = load_first(x + i, n, room - i) - shift;
    if (keep) return d & fVec::loadu(keep + i, n);  // tail lanes load as 0: dropped
    return n < V ? fVec::set(fVec(0), d, n) : d;    // drop tail lanes, which hold 0 - shift
  }

  bool estimate_shift(const scalar_t* x, const opmath_t* keep, int64_t len, int64_t room) {
    using bits_t = std::conditional_t<sizeof(opmath_t) == 8, uint64_t, uint32_t>;
    const int64_t n = std::min(V, len);
    int64_t valid = n;  // among the first n; a padded lane's mask compares equal to 0
    if (keep) valid -= c10::llvm::countPopulation(uint64_t(fVec::loadu(keep, n).zero_mask()) & ((uint64_t(1) << n) - 1));
    if (valid > 0) {
      shift_ = sum_lanes(deviation(x, keep, 0, n, room, fVec(0))) / opmath_t(valid);
    } else {
      int64_t first = n;
      while (first < len && c10::bit_cast<bits_t>(keep[first]) == 0) ++first;
      if (first == len) return false;
      shift_ = opmath_t(x[first]);
    }
    shift_vec_ = fVec(shift_);
    has_shift_ = true;
    return true;
  }

  opmath_t shift_ = 0;
  fVec shift_vec_ = fVec(0);
  bool has_shift_ = false;
  fVec ds0_ = fVec(0), ds1_ = fVec(0), d20_ = fVec(0), d21_ = fVec(0);
};

// Whether sums of d = x - shift over k values (ds = sum d, d2 = sum d^2)
// came from a shift near enough to their mean: M2 = d2 - ds^2 / k then
// multiplies the squares' relative rounding error by at most 8 (3 bits).
inline bool shift_near_mean(MergeT ds, MergeT d2, MergeT k) { return ds * ds / k <= MergeT(0.875) * d2; }

// Moments of the `count` valid elements of the spans that visit(add) adds
// (add(x, keep, len, room), as ShiftedSums::add), visited once or, for the
// second pass, three times. M2 = sum(d^2) - sum(d)^2 / count, with d = x -
// shift (RowShift): the shift is near the mean, so the subtraction cancels
// little and data with a large offset keeps its variance. The sums are
// combined in MergeT (the correction is below the float shift's ulp).
template <RowShift kShift, typename scalar_t, typename Visit>
Moments<MergeT> visited_moments(int64_t count, const Visit& visit) {
  using opmath_t = at::opmath_type<scalar_t>;
  Moments<MergeT> m;
  if (count == 0) return m;
  const MergeT k = MergeT(count);
  opmath_t shift = 0;
  MergeT ds = 0, d2 = 0;
  if constexpr (kShift == RowShift::kEstimate) {
    ShiftedSums<scalar_t, true> sums;
    visit([&](const scalar_t* x, const opmath_t* keep, int64_t len, int64_t room) { sums.add(x, keep, len, room); });
    shift = sums.shift();
    ds = sums.sum();
    d2 = sums.sum_of_squares();
  }
  // The bound on cancellation holds only where the squares are normal
  // floats (subnormal squares round to an absolute, not relative, step).
  const bool estimate_holds =
      shift_near_mean(ds, d2, k) && d2 >= k * MergeT(std::numeric_limits<opmath_t>::min());
  if (kShift == RowShift::kMean || !estimate_holds) {
    ShiftedSums<scalar_t, false> total(0);
    visit([&](const scalar_t* x, const opmath_t* keep, int64_t len, int64_t room) { total.add(x, keep, len, room); });
    shift = total.sum() / opmath_t(count);  // the mean
    ShiftedSums<scalar_t, true> sums(shift);
    visit([&](const scalar_t* x, const opmath_t* keep, int64_t len, int64_t room) { sums.add(x, keep, len, room); });
    ds = sums.sum();
    d2 = sums.sum_of_squares();
  }
  m.count = count;
  m.mean = MergeT(shift) + ds / k;
  m.m2 = std::max(d2 - ds * ds / k, MergeT(0));
  return m;
}

// Moments of the `count` valid elements of a contiguous row of length `len`
// (visited_moments). `keep` is a per-element lane mask (see keep_bits), or
// nullptr when every element is valid. `room` >= len: how many elements may
// be read from x (a run of valid positions inside a longer row).
template <RowShift kShift, typename scalar_t>
Moments<MergeT> row_moments(
    const scalar_t* x, const at::opmath_type<scalar_t>* keep, int64_t len, int64_t count, int64_t room = 0) {
  room = std::max(room, len);
  return visited_moments<kShift, scalar_t>(count, [&](const auto& add) { add(x, keep, len, room); });
}

}  // namespace masknorm::cpu

namespace masknorm::cpu {

// Rows per parallel task so that each task touches about GRAIN_SIZE elements.
inline int64_t row_grain(int64_t row_width) {
  return std::max<int64_t>(1, at::internal::GRAIN_SIZE / std::max<int64_t>(1, row_width));
}

// Per-thread accumulators of `width` values each, `arrays` of them per thread,
// summed at the end. Parameter gradients and per-channel statistics are
// reduced this way, without atomics and with a fixed summation order per
// thread count.
template <typename T>
class PerThreadBuffers {
 public:
  PerThreadBuffers(int64_t width, int64_t arrays)
      : width_(width), arrays_(arrays), threads_(at::get_num_threads()),
        data_(static_cast<size_t>(width * arrays * threads_), T(0)) {}

  // Array `which` of the calling thread (call inside at::parallel_for).
  T* local(int64_t which) {
    return data_.data() + (at::get_thread_num() * arrays_ + which) * width_;
  }
  T* of_thread(int64_t thread, int64_t which) {
    return data_.data() + (thread * arrays_ + which) * width_;
  }
  int64_t threads() const { return threads_; }

  // out[i] = sum over threads of array `which`.
  void sum_into(T* out, int64_t which) {
    std::fill(out, out + width_, T(0));
    for (int64_t t = 0; t < threads_; ++t) {
      const T* src = of_thread(t, which);
      for (int64_t i = 0; i < width_; ++i) out[i] += src[i];
    }
  }

 private:
  int64_t width_, arrays_, threads_;
  std::vector<T> data_;
};

// First position in [l, L) of row whose byte is 0 (valid, want_zero) or
// not 0 (padding), else L. Eight bytes at a time while none qualifies: a
// padding mask is mostly long runs (a padded tail), and building the row
// runs is per call.
inline int64_t find_mask_byte(const MaskByte* row, int64_t l, int64_t L, bool want_zero) {
  constexpr uint64_t kOnes = 0x0101010101010101ULL, kHighs = 0x8080808080808080ULL;
  for (; l + 8 <= L; l += 8) {
    uint64_t w;
    std::memcpy(&w, row + l, sizeof(w));
    const bool has_zero = ((w - kOnes) & ~w & kHighs) != 0;
    if (want_zero ? has_zero : w != 0) break;
  }
  while (l < L && (row[l] == 0) != want_zero) ++l;
  return l;
}

// The CPU kernels' view of a padding mask: its bytes, or nullptr when it is
// undefined or pads nothing (a batch of full-length sequences), so that
// such a batch runs the unmasked loops, without per-row mask bookkeeping.
inline const MaskByte* padding_bytes(const at::Tensor& mask) {
  const MaskByte* pad = mask_bytes(mask);
  if (pad == nullptr) return nullptr;
  const int64_t n = mask.numel();
  return find_mask_byte(pad, 0, n, false) == n ? nullptr : pad;
}

// The padding mask of an (N, L) batch, for loops over contiguous rows of L
// (channels-first batch norm, group norm): per row, the number of valid
// positions, the runs of valid positions and, for rows not visited run by
// run, their lane masks (keep_bits). A row with few runs (the usual suffix
// padding: one) is visited run by run, reading no mask and no padding; a
// fragmented or short row in one pass under its lane masks (for_valid_spans).
template <typename opmath_t>
struct MaskLanes {
  std::vector<opmath_t> keep;    // N * L lane masks, all bits set where valid (rows not by_runs only)
  std::vector<int64_t> valid;    // N counts of valid positions
  std::vector<int64_t> runs;     // [begin, end) pairs of each row's valid runs, row after row
  std::vector<int64_t> row_runs; // N + 1: row n's runs are pairs [row_runs[n], row_runs[n + 1])
  int64_t L = 0, total = 0;

  MaskLanes(const MaskByte* pad, int64_t N, int64_t L)
      : valid(static_cast<size_t>(N)), row_runs(static_cast<size_t>(N + 1)), L(L) {
    runs.reserve(static_cast<size_t>(2 * N));
    bool any_by_lanes = false;
    for (int64_t n = 0; n < N; ++n) {
      const MaskByte* row = pad + n * L;
      int64_t v = 0;
      for (int64_t l = find_mask_byte(row, 0, L, true); l < L; l = find_mask_byte(row, l, L, true)) {
        const int64_t end = find_mask_byte(row, l, L, false);
        runs.push_back(l);
        runs.push_back(end);
        v += end - l;
        l = end;
      }
      valid[n] = v;
      total += v;
      row_runs[n + 1] = static_cast<int64_t>(runs.size()) / 2;
      any_by_lanes = any_by_lanes || !by_runs(n);
    }
    if (!any_by_lanes) return;
    keep.resize(static_cast<size_t>(N * L));
    for (int64_t n = 0; n < N; ++n) {
      if (by_runs(n)) continue;
      const MaskByte* row = pad + n * L;
      opmath_t* k = keep.data() + n * L;
      for (int64_t l = 0; l < L; ++l) k[l] = keep_bits<opmath_t>(row[l] == 0);
    }
  }

  // Whether row n is visited run by run: each run costs a partial vector at
  // each end, so only rows with at most one run per 64 positions (and one
  // more) are. Rows shorter than kMinRunRow are not: their few whole vectors
  // under lane masks cost less than a run's bookkeeping and zeroed tail.
  static constexpr int64_t kMinRunRow = 128;
  bool by_runs(int64_t n) const { return L >= kMinRunRow && row_runs[n + 1] - row_runs[n] <= 1 + L / 64; }

  // Valid positions of row n within [l0, l1).
  int64_t valid_within(int64_t n, int64_t l0, int64_t l1) const {
    int64_t v = 0;
    for (int64_t r = row_runs[n]; r < row_runs[n + 1]; ++r) {
      v += std::max<int64_t>(0, std::min(l1, runs[2 * r + 1]) - std::max(l0, runs[2 * r]));
    }
    return v;
  }
};

// Calls body(begin, end, keep, next) over the valid positions of row n of
// an (N, L) mask within [l0, l1): once per run of valid positions with keep
// == nullptr (every position in [begin, end) is valid), or, for a
// fragmented row, once for all of [l0, l1) with keep = the row's lane masks
// (indexed by position in the row). Without a mask (lanes == nullptr):
// body(l0, l1, nullptr, l1). `next` is where the next span begins (l1 after
// the last): [end, next) is padding, which a loop may write as 0.
template <typename opmath_t, typename Body>
C10_ALWAYS_INLINE void for_valid_spans(
    const MaskLanes<opmath_t>* lanes, int64_t n, int64_t l0, int64_t l1, const Body& body) {
  if (lanes == nullptr) {
    body(l0, l1, static_cast<const opmath_t*>(nullptr), l1);
  } else if (!lanes->by_runs(n)) {
    body(l0, l1, lanes->keep.data() + n * lanes->L, l1);
  } else {
    const int64_t last = lanes->row_runs[n + 1];
    for (int64_t r = lanes->row_runs[n]; r < last; ++r) {
      const int64_t begin = std::max(l0, lanes->runs[2 * r]), end = std::min(l1, lanes->runs[2 * r + 1]);
      const int64_t next = r + 1 < last ? std::min(l1, lanes->runs[2 * r + 2]) : l1;
      if (begin < end) body(begin, end, static_cast<const opmath_t*>(nullptr), next);
    }
  }
}

// Number of valid (non-padding) rows.
inline int64_t count_valid(const MaskByte* pad, int64_t rows) {
  if (pad == nullptr) return rows;
  int64_t padded = 0;
  for (int64_t r = 0; r < rows; ++r) padded += pad[r] != 0;
  return rows - padded;
}

// Zeros n values: memset, as +0.0 is all bits zero in every floating type
// (std::fill over c10::BFloat16/Half stores two bytes at a time).
template <typename scalar_t>
inline void fill_zero(scalar_t* p, int64_t n) {
  static_assert(std::is_trivially_copyable_v<scalar_t>);
  if (n > 0) std::memset(static_cast<void*>(p), 0, static_cast<size_t>(n) * sizeof(scalar_t));
}

// Zeros n values at p (fill_zero); with kStream, the aligned whole vectors
// streamed.
template <bool kStream, typename scalar_t>
C10_ALWAYS_INLINE void zero_span(scalar_t* p, int64_t n) {
  int64_t i = 0;
  if constexpr (kStream) {
    using SIO = StreamIO<scalar_t>;
    for (; i < n && !SIO::aligned(p + i); ++i) p[i] = scalar_t(0);
    for (; i + SIO::fVec::size() <= n; i += SIO::fVec::size()) SIO::store(p + i, typename SIO::fVec(0));
  }
  fill_zero(p + i, n - i);
}

// Padding shorter than this many bytes of input, between valid runs that a
// loop reads, is read anyway (touch_lines) by the loops that write zeros
// there: with the reads stopped for the zeros, each such gap left the read
// stream to restart at the next run, and an elementwise pass over rows with
// short padded tails ran slower than over unpadded rows.
constexpr int64_t kReadThroughBytes = 4096;

// Reads one byte of each 64-byte line from p for n values (volatile: the
// loads are the point) and discards them.
template <typename scalar_t>
C10_ALWAYS_INLINE void touch_lines(const scalar_t* p, int64_t n) {
  const char* bytes = reinterpret_cast<const char*>(p);
  const int64_t size = n * int64_t(sizeof(scalar_t));
  for (int64_t at = 0; at < size; at += 64) (void)*reinterpret_cast<const volatile char*>(bytes + at);
}

// Calls run(std::true_type) for an output of `elements` scalar_t large
// enough for streaming stores (kStreamingBytes, float and double), else
// run(std::false_type).
template <typename scalar_t, typename Run>
C10_ALWAYS_INLINE void with_streaming(int64_t elements, const Run& run) {
  if constexpr (StreamIO<scalar_t>::kStreams) {
    if (elements * int64_t(sizeof(scalar_t)) >= kStreamingBytes) return run(std::true_type{});
  }
  run(std::false_type{});
}

// Stores the k lanes of v at p: streamed where kStream, `stream` (the row
// began aligned: StreamIO::aligned) and the vector is whole.
template <bool kStream, typename scalar_t>
C10_ALWAYS_INLINE void store_row_vector(scalar_t* p, const typename VecIO<scalar_t>::fVec& v, int64_t k, bool stream) {
  if constexpr (kStream) {
    if (stream && k == VecIO<scalar_t>::size()) return StreamIO<scalar_t>::store(p, v);
  }
  VecIO<scalar_t>::store(p, v, k);
}

}  // namespace masknorm::cpu
