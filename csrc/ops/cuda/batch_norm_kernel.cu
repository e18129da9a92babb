// CUDA kernels of the batch-norm stages (kernels.h: BatchNormStatsArgs,
// BatchNormMergeStatsArgs, BatchNormElemtArgs, BatchNormBackwardReduceArgs,
// BatchNormBackwardElemtArgs; the ops are ../batch_norm.cpp; the CPU loops
// are ../cpu/batch_norm_kernel.cpp).
//
// Both layouts as (outer, C, inner): channels last (NC, NLC: inner = 1, one
// mask entry per row of C channels) and channels first (NCL: outer = N,
// inner = L, the mask (N, L) selects positions inside each row of L).
//  - Per-channel reductions (statistics: Welford; backward: sums of dy and
//    dy * (x - mean)) run in two kernels: blocks reduce chunks of positions
//    into (chunks, C) partials, then each channel merges its partials in
//    chunk order. No atomics: the same result every run.
//  - Elementwise kernels compute out from x, dy and per-channel coefficients
//    prepared once (Terms: forward, the affine folded into coef_x = invstd * w,
//    coef_k = b; backward, from the sums, or dy alone with given statistics).
// Loads and stores are 16-byte vectors along the contiguous dimension when
// it and the pointers allow, else single elements. Padded positions are
// never read; their outputs are written 0.
#include "../kernels.h"
#include "cuda_utils.cuh"

namespace masknorm::cuda {
namespace {

constexpr int kThreads = 256;

// ------------------------------------------------------- per-channel reductions

// What a reduction accumulates per channel (Acc, per thread and lane), what
// it merges (State), and how partial results are stored.
template <typename acc_t>
struct StatsReduction {  // moments of x: shifted sums per thread, Welford to merge
  static constexpr bool kNeedsDy = false;
  using Acc = ShiftedSums<acc_t>;
  using State = Welford<acc_t>;
  __device__ static void add(Acc& s, acc_t x, acc_t, acc_t) { s.add(x); }
  __device__ static State finish(const Acc& s) { return s.moments(); }
  __device__ static void merge(State& s, const State& o) { s.merge(o); }
  __device__ static State shfl_down(const State& s, int offset) {
    State o;
    o.n = __shfl_down_sync(0xffffffffu, s.n, offset);
    o.mean = __shfl_down_sync(0xffffffffu, s.mean, offset);
    o.m2 = __shfl_down_sync(0xffffffffu, s.m2, offset);
    return o;
  }
};

template <typename acc_t>
struct GradSums {
  acc_t dy = 0, dy_xmu = 0;
};

template <typename acc_t>
struct GradReduction {  // sum(dy), sum(dy * (x - mean))
  static constexpr bool kNeedsDy = true;
  using Acc = GradSums<acc_t>;
  using State = GradSums<acc_t>;
  __device__ static void add(Acc& s, acc_t x, acc_t dy, acc_t mean) {
    s.dy += dy;
    s.dy_xmu += dy * (x - mean);
  }
  __device__ static State finish(const Acc& s) { return s; }
  __device__ static void merge(State& s, const State& o) { s.dy += o.dy; s.dy_xmu += o.dy_xmu; }
  __device__ static State shfl_down(const State& s, int offset) {
    State o;
    o.dy = __shfl_down_sync(0xffffffffu, s.dy, offset);
    o.dy_xmu = __shfl_down_sync(0xffffffffu, s.dy_xmu, offset);
    return o;
  }
};

template <typename scalar_t>
struct ReduceParams {
  const scalar_t* x;
  const scalar_t* dy;     // GradReduction only
  const MaskByte* pad;
  const opmath_t<scalar_t>* mean;  // GradReduction only
  void* partial;                   // (chunks, C) R::State
  int64_t outer, C, inner, outer_per_chunk;
  // Channels first: each of the outer_per_chunk rows of L is split into
  // l_chunks segments of inner_per_chunk (chunk = n chunk * l_chunks + segment).
  int64_t inner_per_chunk, l_chunks;
};

// Channels last: block (tx, ty) covers tx * VEC channels; its ty rows step
// through the chunk's rows (four loads in flight per thread); the ty partial
// states merge in order through shared memory.
template <typename scalar_t, int VEC, typename R>
__global__ void __launch_bounds__(kThreads) reduce_channels_last_kernel(const ReduceParams<scalar_t> p) {
  using acc_t = opmath_t<scalar_t>;
  using State = typename R::State;
  constexpr int kUnroll = 4;
  extern __shared__ unsigned char shared_bytes[];
  State* shared = reinterpret_cast<State*>(shared_bytes);  // blockDim.y * blockDim.x * VEC
  const int64_t c0 = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) * VEC;
  const int64_t begin = int64_t(blockIdx.y) * p.outer_per_chunk;
  const int64_t end = std::min(p.outer, begin + p.outer_per_chunk);
  const int64_t step = blockDim.y;
  typename R::Acc acc[VEC];
  acc_t mean[VEC];
  if (c0 < p.C) {
    if (R::kNeedsDy) load<VEC>(p.mean + c0, mean);
    int64_t r = begin + threadIdx.y;
    for (; r + (kUnroll - 1) * step < end; r += kUnroll * step) {
      acc_t xv[kUnroll][VEC], dyv[kUnroll][VEC];
      bool valid[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int64_t row = r + u * step;
        valid[u] = p.pad == nullptr || !p.pad[row];
        if (valid[u]) {
          load<VEC>(p.x + row * p.C + c0, xv[u]);
          if (R::kNeedsDy) load<VEC>(p.dy + row * p.C + c0, dyv[u]);
        }
      }
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        if (!valid[u]) continue;
#pragma unroll
        for (int i = 0; i < VEC; ++i) {
          R::add(acc[i], xv[u][i], R::kNeedsDy ? dyv[u][i] : acc_t(0), R::kNeedsDy ? mean[i] : acc_t(0));
        }
      }
    }
    for (; r < end; r += step) {
      if (p.pad != nullptr && p.pad[r]) continue;
      acc_t xv[VEC], dyv[VEC];
      load<VEC>(p.x + r * p.C + c0, xv);
      if (R::kNeedsDy) load<VEC>(p.dy + r * p.C + c0, dyv);
#pragma unroll
      for (int i = 0; i < VEC; ++i) R::add(acc[i], xv[i], R::kNeedsDy ? dyv[i] : acc_t(0), R::kNeedsDy ? mean[i] : acc_t(0));
    }
  }
  State s[VEC];
  const int lane0 = threadIdx.x * VEC;
#pragma unroll
  for (int i = 0; i < VEC; ++i) {
    s[i] = R::finish(acc[i]);
    shared[(threadIdx.y * blockDim.x) * VEC + lane0 + i] = s[i];
  }
  __syncthreads();
  if (threadIdx.y != 0 || c0 >= p.C) return;
  for (unsigned t = 1; t < blockDim.y; ++t) {
#pragma unroll
    for (int i = 0; i < VEC; ++i) R::merge(s[i], shared[(t * blockDim.x) * VEC + lane0 + i]);
  }
#pragma unroll
  for (int i = 0; i < VEC; ++i) {
    if (c0 + i < p.C) static_cast<State*>(p.partial)[int64_t(blockIdx.y) * p.C + c0 + i] = s[i];
  }
}

// Channels first: block (channel, chunk of n and segment of l); its threads
// step through the (n, l) positions, VEC along l; the block's states merge as
// a tree.
template <typename scalar_t, int VEC, typename R>
__global__ void __launch_bounds__(kThreads) reduce_channels_first_kernel(const ReduceParams<scalar_t> p) {
  using acc_t = opmath_t<scalar_t>;
  using State = typename R::State;
  __shared__ State shared[kThreads];
  const int64_t c = blockIdx.x;
  const int64_t n_chunk = blockIdx.y / p.l_chunks, l_chunk = blockIdx.y % p.l_chunks;
  const int64_t begin = n_chunk * p.outer_per_chunk;
  const int64_t end = std::min(p.outer, begin + p.outer_per_chunk);
  const int64_t l_begin = l_chunk * p.inner_per_chunk;
  const int64_t l_end = std::min(p.inner, l_begin + p.inner_per_chunk);
  const acc_t mean = R::kNeedsDy ? p.mean[c] : acc_t(0);
  typename R::Acc acc;
  for (int64_t n = begin; n < end; ++n) {
    const scalar_t* xr = p.x + (n * p.C + c) * p.inner;
    const scalar_t* dyr = R::kNeedsDy ? p.dy + (n * p.C + c) * p.inner : nullptr;
    const MaskByte* padr = p.pad != nullptr ? p.pad + n * p.inner : nullptr;
    for (int64_t l = l_begin + int64_t(threadIdx.x) * VEC; l < l_end; l += int64_t(blockDim.x) * VEC) {
      acc_t xv[VEC], dyv[VEC];
      load<VEC>(xr + l, xv);
      if (R::kNeedsDy) load<VEC>(dyr + l, dyv);
      Pack<MaskByte, VEC> pad;
      if (padr != nullptr) pad = *reinterpret_cast<const Pack<MaskByte, VEC>*>(padr + l);
#pragma unroll
      for (int i = 0; i < VEC; ++i) {
        if (padr == nullptr || !pad.v[i]) R::add(acc, xv[i], R::kNeedsDy ? dyv[i] : acc_t(0), mean);
      }
    }
  }
  shared[threadIdx.x] = R::finish(acc);
  for (unsigned stride = blockDim.x / 2; stride > 0; stride /= 2) {
    __syncthreads();
    if (threadIdx.x < stride) R::merge(shared[threadIdx.x], shared[threadIdx.x + stride]);
  }
  if (threadIdx.x == 0) static_cast<State*>(p.partial)[int64_t(blockIdx.y) * p.C + c] = shared[0];
}

// The partials of channel c over chunks, by a warp: lane l takes chunks l,
// l + 32, ... in order, then the 32 lane results merge in a fixed shuffle
// pattern (the same result every run). Blocks of 8 warps, a channel each.
template <typename R>
__device__ __forceinline__ typename R::State merge_chunks(
    const typename R::State* partial, int64_t chunks, int64_t C, int64_t c) {
  using State = typename R::State;
  State s;
  for (int64_t k = threadIdx.x; k < chunks; k += 32) R::merge(s, partial[k * C + c]);
  for (int offset = 16; offset > 0; offset /= 2) {
    const State o = R::shfl_down(s, offset);
    if (int(threadIdx.x) < offset) R::merge(s, o);
  }
  return s;
}

// Statistics: mean and M2 per channel, and the count (channel 0's: every
// channel sees the same positions).
template <typename acc_t>
__global__ void finish_stats_kernel(
    const Welford<acc_t>* partial, int64_t chunks, int64_t C, acc_t* mean, acc_t* m2, int64_t* count) {
  const int64_t c = int64_t(blockIdx.x) * blockDim.y + threadIdx.y;
  if (c >= C) return;  // whole warps: c is the same for the 32 lanes
  const auto s = merge_chunks<StatsReduction<acc_t>>(partial, chunks, C, c);
  if (threadIdx.x != 0) return;
  if (c == 0) *count = s.n;
  mean[c] = s.mean;
  m2[c] = s.m2;
}

// Backward sums: sum(dy * xhat) = invstd * sum(dy * (x - mean)).
template <typename acc_t>
__global__ void finish_grad_sums_kernel(
    const GradSums<acc_t>* partial, int64_t chunks, int64_t C, const acc_t* invstd, acc_t* sum_dy, acc_t* sum_dy_xhat) {
  const int64_t c = int64_t(blockIdx.x) * blockDim.y + threadIdx.y;
  if (c >= C) return;
  const auto s = merge_chunks<GradReduction<acc_t>>(partial, chunks, C, c);
  if (threadIdx.x != 0) return;
  sum_dy[c] = s.dy;
  sum_dy_xhat[c] = s.dy_xmu * invstd[c];
}

// Runs reduction R over the layout into (chunks, C) partial states (bytes).
template <typename scalar_t, typename R>
at::Tensor reduce_channels(
    const BatchNormLayout& g, const at::Tensor& input, const at::Tensor& grad_output, const at::Tensor& mask,
    const at::Tensor& mean, const at::TensorOptions& acc_options, int64_t& chunks) {
  using acc_t = opmath_t<scalar_t>;
  constexpr int V = kVec<scalar_t>;
  const int64_t target_blocks = int64_t(multiprocessors()) * 8;  // two waves: a short tail
  ReduceParams<scalar_t> p{
      input.const_data_ptr<scalar_t>(), R::kNeedsDy ? grad_output.const_data_ptr<scalar_t>() : nullptr,
      mask_bytes(mask), R::kNeedsDy ? mean.const_data_ptr<acc_t>() : nullptr, nullptr, g.outer(), g.C,
      g.inner(), 0, 0, 1};
  const bool vec = vector_ok<scalar_t>(
                       g.channels_last ? g.C : g.inner(),
                       {p.x, p.dy, R::kNeedsDy && g.channels_last ? static_cast<const void*>(p.mean) : nullptr}) &&
      (g.channels_last || mask_vector_ok<scalar_t>(p.pad));
  using State = typename R::State;
  const auto partials = [&](int64_t count) {
    return at::empty({count, g.C, int64_t(sizeof(State))}, acc_options.dtype(at::kByte));
  };
  if (g.channels_last) {
    const int64_t vectors = vec ? g.C / V : g.C;
    int tx = 1;
    while (tx < 32 && tx < vectors) tx *= 2;
    const int ty = kThreads / tx;
    const int64_t grid_x = ceil_div(vectors, tx);
    chunks = std::clamp<int64_t>(ceil_div(target_blocks, grid_x), 1, std::min<int64_t>(ceil_div(g.outer(), ty), 65535));
    p.outer_per_chunk = ceil_div(g.outer(), chunks);
    chunks = ceil_div(g.outer(), p.outer_per_chunk);
    at::Tensor partial = partials(chunks);
    p.partial = partial.mutable_data_ptr();
    const dim3 grid{static_cast<unsigned>(grid_x), static_cast<unsigned>(chunks)}, block(tx, ty);
    const size_t shared = size_t(kThreads) * (vec ? V : 1) * sizeof(State);
    if (vec) {
      launch(reduce_channels_last_kernel<scalar_t, V, R>, grid, block, shared, p);
    } else {
      launch(reduce_channels_last_kernel<scalar_t, 1, R>, grid, block, shared, p);
    }
    return partial;
  }
  int64_t n_chunks = std::clamp<int64_t>(ceil_div(target_blocks, g.C), 1, std::min<int64_t>(g.outer(), 65535));
  p.outer_per_chunk = ceil_div(g.outer(), n_chunks);
  n_chunks = ceil_div(g.outer(), p.outer_per_chunk);
  // Few (n, c) planes for the machine ((1, 8, 1M) would be 8 blocks): rows of
  // L split into segments too, each at least 4 loads per thread, a whole
  // number of vectors.
  const int64_t step = vec ? V : 1;
  const int64_t min_segment = int64_t(kThreads) * step * 4;
  const int64_t l_chunks = std::clamp<int64_t>(
      ceil_div(target_blocks, g.C * n_chunks), 1,
      std::min<int64_t>(ceil_div(g.inner(), min_segment), 65535 / n_chunks));
  p.inner_per_chunk = ceil_div(ceil_div(g.inner(), l_chunks), step) * step;
  p.l_chunks = ceil_div(g.inner(), p.inner_per_chunk);
  chunks = n_chunks * p.l_chunks;
  at::Tensor partial = partials(chunks);
  p.partial = partial.mutable_data_ptr();
  const dim3 grid{static_cast<unsigned>(g.C), static_cast<unsigned>(chunks)};
  if (vec) {
    launch(reduce_channels_first_kernel<scalar_t, V, R>, grid, dim3(kThreads), 0, p);
  } else {
    launch(reduce_channels_first_kernel<scalar_t, 1, R>, grid, dim3(kThreads), 0, p);
  }
  return partial;
}

// ------------------------------------------------------------- elementwise

template <typename scalar_t>
struct ElemtParams {
  const scalar_t* x;
  const scalar_t* dy;  // gradient terms only
  const MaskByte* pad;
  const opmath_t<scalar_t>* mean;
  const opmath_t<scalar_t>* coef;  // (3, C): coef_x, coef_dy, coef_k
  scalar_t* out;
  int64_t outer, C, inner;
};

// What the elementwise kernels write at valid positions (0 at padding):
enum class Terms {
  kNormalize,     // (x - mean) * coef_x + coef_k: the normalization
  kGradient,      // (dy + coef_k) * coef_dy + (x - mean) * coef_x: the input gradient with
                  // batch statistics, coef_k = -sum_dy / n (dy + coef_k is exactly 0 where
                  // dy is the channel's only value; dy * coef_dy - fl(dy * coef_dy) fused
                  // into an FMA is not)
  kGradientOfDy,  // dy * coef_dy: given statistics (x and mean are not read: inf/NaN
                  // there cannot reach the gradient)
};

template <typename scalar_t, int VEC, Terms TERMS>
__device__ __forceinline__ void elemt_vector(
    const ElemtParams<scalar_t>& p, int64_t offset, const opmath_t<scalar_t> (&mean)[VEC],
    const opmath_t<scalar_t> (&cx)[VEC], const opmath_t<scalar_t> (&cdy)[VEC], const opmath_t<scalar_t> (&ck)[VEC],
    const MaskByte* pad) {
  using acc_t = opmath_t<scalar_t>;
  acc_t xv[VEC], dyv[VEC], out[VEC];
  if (TERMS != Terms::kGradientOfDy) load<VEC>(p.x + offset, xv);
  if (TERMS != Terms::kNormalize) load<VEC>(p.dy + offset, dyv);
#pragma unroll
  for (int i = 0; i < VEC; ++i) {
    // Scalar math: the formulas of Terms
    if constexpr (TERMS == Terms::kNormalize) {
      out[i] = (xv[i] - mean[i]) * cx[i] + ck[i];
    } else if constexpr (TERMS == Terms::kGradient) {
      out[i] = (dyv[i] + ck[i]) * cdy[i] + (xv[i] - mean[i]) * cx[i];
    } else {
      out[i] = dyv[i] * cdy[i];
    }
  }
  if (pad != nullptr) {
    const Pack<MaskByte, VEC> padded = *reinterpret_cast<const Pack<MaskByte, VEC>*>(pad);
#pragma unroll
    for (int i = 0; i < VEC; ++i) out[i] = padded.v[i] ? acc_t(0) : out[i];
  }
  store<VEC>(p.out + offset, out);
}

// Channels last: threads along C (coefficients loaded once), blocks along rows.
template <typename scalar_t, int VEC, Terms TERMS>
__global__ void __launch_bounds__(kThreads) elemt_channels_last_kernel(const ElemtParams<scalar_t> p) {
  using acc_t = opmath_t<scalar_t>;
  const int64_t c0 = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) * VEC;
  if (c0 >= p.C) return;
  acc_t mean[VEC], cx[VEC], cdy[VEC], ck[VEC];
  load<VEC>(p.mean + c0, mean);
  load<VEC>(p.coef + c0, cx);
  load<VEC>(p.coef + p.C + c0, cdy);
  load<VEC>(p.coef + 2 * p.C + c0, ck);
  for (int64_t r = int64_t(blockIdx.y) * blockDim.y + threadIdx.y; r < p.outer; r += int64_t(gridDim.y) * blockDim.y) {
    if (p.pad != nullptr && p.pad[r]) {
      store_zero<VEC>(p.out + r * p.C + c0);
      continue;
    }
    elemt_vector<scalar_t, VEC, TERMS>(p, r * p.C + c0, mean, cx, cdy, ck, nullptr);
  }
}

// Channels first: threads along L, blocks along the (n, c) planes.
template <typename scalar_t, int VEC, Terms TERMS>
__global__ void __launch_bounds__(kThreads) elemt_channels_first_kernel(const ElemtParams<scalar_t> p) {
  using acc_t = opmath_t<scalar_t>;
  const int64_t l = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) * VEC;
  if (l >= p.inner) return;
  for (int64_t plane = blockIdx.y; plane < p.outer * p.C; plane += gridDim.y) {
    const int64_t n = plane / p.C, c = plane - n * p.C;
    acc_t mean[VEC], cx[VEC], cdy[VEC], ck[VEC];
#pragma unroll
    for (int i = 0; i < VEC; ++i) {
      mean[i] = p.mean[c];
      cx[i] = p.coef[c];
      cdy[i] = p.coef[p.C + c];
      ck[i] = p.coef[2 * p.C + c];
    }
    elemt_vector<scalar_t, VEC, TERMS>(
        p, plane * p.inner + l, mean, cx, cdy, ck, p.pad != nullptr ? p.pad + n * p.inner + l : nullptr);
  }
}

// Forward coefficients: coef_x = invstd * w, coef_dy = 0, coef_k = b.
// Backward: coef_dy = w * invstd; with batch statistics over n = max(count, 1)
// positions (as the generic kernels) also coef_x = -coef_dy * invstd *
// sum_dy_xhat / n and coef_k = -sum_dy / n (Terms::kGradient).
template <typename acc_t>
__global__ void coefficients_kernel(
    int64_t C, const acc_t* invstd, const acc_t* weight, const acc_t* bias, const acc_t* sum_dy,
    const acc_t* sum_dy_xhat, const int64_t* count, bool backward, acc_t* coef) {
  const int64_t c = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= C) return;
  const acc_t scale = weight != nullptr ? weight[c] * invstd[c] : invstd[c];
  if (!backward) {
    coef[c] = scale;
    coef[C + c] = 0;
    coef[2 * C + c] = bias != nullptr ? bias[c] : acc_t(0);
    return;
  }
  acc_t cx = 0, ck = 0;
  if (sum_dy != nullptr) {
    const acc_t inv_n = acc_t(1) / acc_t(*count > 1 ? *count : int64_t(1));
    cx = -scale * invstd[c] * sum_dy_xhat[c] * inv_n;
    ck = -sum_dy[c] * inv_n;
  }
  coef[c] = cx;
  coef[C + c] = scale;
  coef[2 * C + c] = ck;
}

template <typename scalar_t, Terms TERMS>
void elementwise(
    const BatchNormLayout& g, const at::Tensor& input, const at::Tensor& grad_output, const at::Tensor& mask,
    const at::Tensor& mean, const at::Tensor& coef, const at::Tensor& out) {
  using acc_t = opmath_t<scalar_t>;
  constexpr int V = kVec<scalar_t>;
  const ElemtParams<scalar_t> p{
      input.const_data_ptr<scalar_t>(), TERMS != Terms::kNormalize ? grad_output.const_data_ptr<scalar_t>() : nullptr,
      mask_bytes(mask), mean.const_data_ptr<acc_t>(), coef.const_data_ptr<acc_t>(),
      out.mutable_data_ptr<scalar_t>(), g.outer(), g.C, g.inner()};
  const int64_t along = g.channels_last ? g.C : g.inner();
  // Channels last also loads mean and the coefficient rows as vectors: with
  // C a multiple of the vector, each (3, C) row starts 16-byte aligned.
  const bool vec = vector_ok<scalar_t>(
                       along, {p.x, p.dy, p.out, g.channels_last ? static_cast<const void*>(p.mean) : nullptr,
                               g.channels_last ? static_cast<const void*>(p.coef) : nullptr}) &&
      (g.channels_last || mask_vector_ok<scalar_t>(p.pad));
  const int64_t vectors = vec ? along / V : along;
  int tx = 1;
  while (tx < kThreads && tx < vectors) tx *= 2;
  const int64_t grid_x = ceil_div(vectors, tx);
  if (g.channels_last) {
    const int ty = kThreads / tx;
    const int64_t grid_y = std::min<int64_t>(ceil_div(g.outer(), ty), 65535);
    const dim3 grid{static_cast<unsigned>(grid_x), static_cast<unsigned>(grid_y)}, block(tx, ty);
    if (vec) {
      launch(elemt_channels_last_kernel<scalar_t, V, TERMS>, grid, block, 0, p);
    } else {
      launch(elemt_channels_last_kernel<scalar_t, 1, TERMS>, grid, block, 0, p);
    }
    return;
  }
  const int64_t grid_y = std::min<int64_t>(g.outer() * g.C, 65535);
  const dim3 grid{static_cast<unsigned>(grid_x), static_cast<unsigned>(grid_y)}, block(tx);
  if (vec) {
    launch(elemt_channels_first_kernel<scalar_t, V, TERMS>, grid, block, 0, p);
  } else {
    launch(elemt_channels_first_kernel<scalar_t, 1, TERMS>, grid, block, 0, p);
  }
}

at::Tensor coefficients(
    const at::Tensor& invstd, const at::Tensor& weight, const at::Tensor& bias, const at::Tensor& sum_dy,
    const at::Tensor& sum_dy_xhat, const at::Tensor& count, bool backward) {
  const int64_t C = invstd.numel();
  at::Tensor coef = at::empty({3, C}, invstd.options());
  AT_DISPATCH_FLOATING_TYPES(invstd.scalar_type(), "masknorm_batch_norm_coefficients_cuda", [&] {
    launch(coefficients_kernel<scalar_t>, dim3(static_cast<unsigned>(ceil_div(C, kThreads))), dim3(kThreads), 0, C,
           invstd.const_data_ptr<scalar_t>(), data_or_null<scalar_t>(weight), data_or_null<scalar_t>(bias),
           data_or_null<scalar_t>(sum_dy), data_or_null<scalar_t>(sum_dy_xhat), data_or_null<int64_t>(count),
           backward, coef.mutable_data_ptr<scalar_t>());
  });
  return coef;
}

// ------------------------------------------------------------- merge

template <typename acc_t>
__global__ void __launch_bounds__(kThreads) merge_stats_kernel(
    const acc_t* part_mean, const acc_t* part_m2, const int64_t* part_count, int64_t parts, int64_t C,
    acc_t* running_mean, acc_t* running_var, int64_t* num_batches_tracked, bool has_momentum, double momentum,
    acc_t eps, acc_t* mean, acc_t* invstd, int64_t* count) {
  int64_t total = 0;
  for (int64_t k = 0; k < parts; ++k) total += part_count[k];
  // One block: every thread reads num_batches_tracked before thread 0 increments it.
  const int64_t batches = num_batches_tracked != nullptr ? *num_batches_tracked + 1 : 1;
  __syncthreads();
  if (threadIdx.x == 0) {
    *count = total;
    if (num_batches_tracked != nullptr) *num_batches_tracked = batches;
  }
  const bool update = running_mean != nullptr && total >= 2;
  // Scalar math: factor = momentum, or 1 / num_batches_tracked (cumulative average)
  const double factor = has_momentum ? momentum : 1.0 / double(batches);
  for (int64_t c = threadIdx.x; c < C; c += blockDim.x) {
    Welford<acc_t> s;  // parts in order; parts with count 0 skipped
    for (int64_t k = 0; k < parts; ++k) {
      if (part_count[k] <= 0) continue;
      Welford<acc_t> part;
      part.n = part_count[k];
      part.mean = part_mean[k * C + c];
      part.m2 = part_m2[k * C + c];
      s.merge(part);
    }
    mean[c] = s.mean;
    invstd[c] = total > 0 ? acc_t(1) / sqrt(s.m2 / acc_t(total) + eps) : acc_t(0);
    if (update) {
      const double unbiased = double(s.m2) / double(total - 1);
      running_mean[c] = acc_t((1.0 - factor) * double(running_mean[c]) + factor * double(s.mean));
      running_var[c] = acc_t((1.0 - factor) * double(running_var[c]) + factor * unbiased);
    }
  }
}

}  // namespace

// ------------------------------------------------------------------ kernels

void batch_norm_stats(const BatchNormStatsArgs& a) {
  const BatchNormLayout g = loop_layout(a.layout);
  if (g.outer() * g.inner() == 0 || g.C == 0) {
    a.mean.zero_();
    a.m2.zero_();
    a.count.zero_();
    return;
  }
  const c10::cuda::CUDAGuard guard(a.input.device());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, a.input.scalar_type(), "masknorm_batch_norm_stats_cuda", [&] {
    using acc_t = opmath_t<scalar_t>;
    int64_t chunks = 0;
    const at::Tensor partial = reduce_channels<scalar_t, StatsReduction<acc_t>>(
        g, a.input, at::Tensor(), a.padding_mask, at::Tensor(), a.mean.options(), chunks);
    launch(finish_stats_kernel<acc_t>, dim3(static_cast<unsigned>(ceil_div(g.C, 8))), dim3(32, 8), 0,
           static_cast<const Welford<acc_t>*>(partial.const_data_ptr()), chunks, g.C, a.mean.mutable_data_ptr<acc_t>(),
           a.m2.mutable_data_ptr<acc_t>(), a.count.mutable_data_ptr<int64_t>());
  });
}

void batch_norm_merge_stats(const BatchNormMergeStatsArgs& a) {
  const c10::cuda::CUDAGuard guard(a.mean.device());
  AT_DISPATCH_FLOATING_TYPES(a.mean.scalar_type(), "masknorm_batch_norm_merge_stats_cuda", [&] {
    launch(merge_stats_kernel<scalar_t>, dim3(1), dim3(kThreads), 0, a.part_mean.const_data_ptr<scalar_t>(),
           a.part_m2.const_data_ptr<scalar_t>(), a.part_count.const_data_ptr<int64_t>(), a.parts, a.C,
           data_or_null<scalar_t>(a.running_mean), data_or_null<scalar_t>(a.running_var),
           data_or_null<int64_t>(a.num_batches_tracked), a.has_momentum, a.momentum, scalar_t(a.eps),
           a.mean.mutable_data_ptr<scalar_t>(), a.invstd.mutable_data_ptr<scalar_t>(),
           a.count.mutable_data_ptr<int64_t>());
  });
}

void batch_norm_elemt(const BatchNormElemtArgs& a) {
  const BatchNormLayout g = loop_layout(a.layout);
  const c10::cuda::CUDAGuard guard(a.input.device());
  set_from_running_stats(a);
  if (a.input.numel() == 0) return;
  const at::Tensor coef = coefficients(a.invstd, a.weight, a.bias, {}, {}, {}, /*backward=*/false);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, a.input.scalar_type(), "masknorm_batch_norm_elemt_cuda", [&] {
    elementwise<scalar_t, Terms::kNormalize>(g, a.input, at::Tensor(), a.padding_mask, aligned16(a.mean), coef, a.output);
  });
}

void batch_norm_backward_reduce(const BatchNormBackwardReduceArgs& a) {
  const BatchNormLayout g = loop_layout(a.layout);
  if (g.outer() * g.inner() == 0 || g.C == 0) {
    a.sum_dy.zero_();
    a.sum_dy_xhat.zero_();
    return;
  }
  const c10::cuda::CUDAGuard guard(a.input.device());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, a.input.scalar_type(), "masknorm_batch_norm_backward_reduce_cuda", [&] {
    using acc_t = opmath_t<scalar_t>;
    int64_t chunks = 0;
    const at::Tensor partial = reduce_channels<scalar_t, GradReduction<acc_t>>(
        g, a.input, a.grad_output, a.padding_mask, aligned16(a.mean), a.sum_dy.options(), chunks);
    launch(finish_grad_sums_kernel<acc_t>, dim3(static_cast<unsigned>(ceil_div(g.C, 8))), dim3(32, 8), 0,
           static_cast<const GradSums<acc_t>*>(partial.const_data_ptr()), chunks, g.C, a.invstd.const_data_ptr<acc_t>(),
           a.sum_dy.mutable_data_ptr<acc_t>(), a.sum_dy_xhat.mutable_data_ptr<acc_t>());
  });
}

void batch_norm_backward_elemt(const BatchNormBackwardElemtArgs& a) {
  const BatchNormLayout g = loop_layout(a.layout);
  if (a.input.numel() == 0) return;
  const c10::cuda::CUDAGuard guard(a.input.device());
  const at::Tensor coef =
      coefficients(a.invstd, a.weight, {}, a.sum_dy, a.sum_dy_xhat, a.count, /*backward=*/true);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, a.input.scalar_type(), "masknorm_batch_norm_backward_elemt_cuda", [&] {
    const at::Tensor mean = aligned16(a.mean);
    if (a.sum_dy.defined()) {
      elementwise<scalar_t, Terms::kGradient>(g, a.input, a.grad_output, a.padding_mask, mean, coef, a.grad_input);
    } else {
      elementwise<scalar_t, Terms::kGradientOfDy>(g, a.input, a.grad_output, a.padding_mask, mean, coef, a.grad_input);
    }
  });
}

}  // namespace masknorm::cuda
