// Device helpers shared by the CUDA kernels (row_norm_kernel.cu,
// batch_norm_kernel.cu): 16-byte vector loads and stores converted to the
// accumulation type, warp and block sums, Welford moments, and the launch
// check. Everything runs on the current stream under the input's device guard
// (the kernels' host functions set both).
#pragma once

#include "../arg_pointers.h"

#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAException.h>

#include <cstdint>
#include <initializer_list>
#include <utility>

namespace masknorm::cuda {

template <typename scalar_t>
using opmath_t = at::opmath_type<scalar_t>;

// Elements per 16-byte vector of scalar_t.
template <typename scalar_t>
constexpr int kVec = 16 / int(sizeof(scalar_t));

template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

// Elements of T moved by one access of N elements: at most 16 bytes.
template <typename T, int N>
constexpr int kPiece = N * int(sizeof(T)) > 16 ? 16 / int(sizeof(T)) : N;

// Loads N consecutive elements as opmath values, in accesses of at most 16
// bytes (p aligned to 16 bytes, or to N elements when fewer).
template <int N, typename T>
__device__ __forceinline__ void load(const T* p, opmath_t<T> (&out)[N]) {
  constexpr int P = kPiece<T, N>;
#pragma unroll
  for (int j = 0; j < N; j += P) {
    const Pack<T, P> pack = *reinterpret_cast<const Pack<T, P>*>(p + j);
#pragma unroll
    for (int i = 0; i < P; ++i) out[j + i] = static_cast<opmath_t<T>>(pack.v[i]);
  }
}

template <int N, typename T>
__device__ __forceinline__ void store(T* p, const opmath_t<T> (&in)[N]) {
  constexpr int P = kPiece<T, N>;
#pragma unroll
  for (int j = 0; j < N; j += P) {
    Pack<T, P> pack;
#pragma unroll
    for (int i = 0; i < P; ++i) pack.v[i] = static_cast<T>(in[j + i]);
    *reinterpret_cast<Pack<T, P>*>(p + j) = pack;
  }
}

template <int N, typename T>
__device__ __forceinline__ void store_zero(T* p) {
  opmath_t<T> zero[N];
#pragma unroll
  for (int i = 0; i < N; ++i) zero[i] = 0;
  store<N>(p, zero);
}

// Sum over groups of `width` consecutive lanes (a power of two <= 32); every
// lane of the warp must call it.
template <typename T>
__device__ __forceinline__ T group_sum(T v, int width) {
  for (int offset = width / 2; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset, width);
  return v;
}

// Sum over the blockDim.x threads of each block row (blockDim.x a power of
// two; blockDim.y rows per block). Above 32 threads per row the warps' sums
// go through `scratch` (32 values per row); then every thread of the block
// must call it. The order of additions is fixed: deterministic.
template <typename T>
__device__ __forceinline__ T row_sum(T v, T* scratch) {
  if (blockDim.x <= 32) return group_sum(v, int(blockDim.x));
  v = group_sum(v, 32);
  const int warp = threadIdx.x / 32, warps = blockDim.x / 32;
  T* row_scratch = scratch + threadIdx.y * 32;
  __syncthreads();  // scratch may still be read by a previous call
  if (threadIdx.x % 32 == 0) row_scratch[warp] = v;
  __syncthreads();
  T total = 0;
  for (int w = 0; w < warps; ++w) total += row_scratch[w];
  return total;
}

// a * b rounded, never fused into a following add: where a product must
// cancel exactly against a sum of the same products (a row of width 1).
__device__ __forceinline__ float mul_rn(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ double mul_rn(double a, double b) { return __dmul_rn(a, b); }

// Count, mean and sum of squared deviations; Welford updates, Chan merges.
// The count is an integer: a float count is exact only up to 2^24 values.
template <typename T>
struct Welford {
  int64_t n = 0;
  T mean = 0, m2 = 0;

  __device__ __forceinline__ void add(T x) {
    n += 1;
    const T delta = x - mean;
    mean += delta / T(n);
    m2 += delta * (x - mean);
  }

  __device__ __forceinline__ void merge(const Welford& o) {
    if (o.n == 0) return;
    if (n == 0) {
      *this = o;
      return;
    }
    const int64_t total = n + o.n;
    const T delta = o.mean - mean;
    const T f = T(double(o.n) / double(total));
    mean += delta * f;
    m2 += o.m2 + delta * delta * T(n) * f;
    n = total;
  }
};

// Count, sum and sum of squares of values shifted by the first value seen:
// no division per value and no chain through a running mean, and as stable
// as Welford on data with a large offset (the shift removes it). Finished
// into Welford form to be merged.
template <typename T>
struct ShiftedSums {
  int64_t n = 0;
  T shift = 0, s1 = 0, s2 = 0;

  __device__ __forceinline__ void add(T x) {
    if (n == 0) shift = x;
    const T d = x - shift;
    s1 += d;
    s2 += d * d;
    n += 1;
  }

  __device__ __forceinline__ Welford<T> moments() const {
    Welford<T> w;
    if (n == 0) return w;
    const T mean_d = s1 / T(n);
    w.n = n;
    w.mean = shift + mean_d;
    w.m2 = s2 - s1 * mean_d;
    if (w.m2 < T(0)) w.m2 = T(0);
    return w;
  }
};

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

inline int multiprocessors() { return at::cuda::getCurrentDeviceProperties()->multiProcessorCount; }

// True when every pointer is aligned to a 16-byte vector of scalar_t and `inner`
// (the contiguous length vectors run along) is a multiple of its elements.
template <typename scalar_t>
bool vector_ok(int64_t inner, std::initializer_list<const void*> pointers) {
  if (inner % kVec<scalar_t> != 0) return false;
  for (const void* p : pointers) {
    if (p != nullptr && reinterpret_cast<uintptr_t>(p) % 16 != 0) return false;
  }
  return true;
}

// True when a padding mask read kVec<scalar_t> bytes at a time (one byte per
// element of a vector) can be: those bytes aligned, or no mask.
template <typename scalar_t>
bool mask_vector_ok(const MaskByte* pad) {
  return pad == nullptr || reinterpret_cast<uintptr_t>(pad) % kVec<scalar_t> == 0;
}

// A small per-channel or per-column tensor (weight, bias, mean) as the
// vector loads want it: itself when 16-byte aligned (or undefined), else an
// aligned copy. A view into a flat parameter (FSDP) at any offset then keeps
// the vector path, instead of turning it off for the whole input.
inline at::Tensor aligned16(const at::Tensor& t) {
  if (!t.defined() || reinterpret_cast<uintptr_t>(t.const_data_ptr()) % 16 == 0) return t;
  return t.clone();
}

// Launches `kernel` on the current stream and checks the launch.
template <typename... Params, typename... Args>
void launch(void (*kernel)(Params...), dim3 grid, dim3 block, size_t shared_bytes, Args&&... args) {
  kernel<<<grid, block, shared_bytes, at::cuda::getCurrentCUDAStream()>>>(std::forward<Args>(args)...);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace masknorm::cuda
