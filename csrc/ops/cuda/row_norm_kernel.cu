// CUDA kernels of layer norm and RMS norm (kernels.h: RowNormForwardArgs,
// RowNormBackwardArgs; the op is ../row_norm.cpp; the CPU loops are
// ../cpu/row_norm_kernel.cpp). RMS norm is layer norm with the mean fixed
// at 0 (`centered` false) and no bias.
//
// One pass over each row: a group of blockDim.x threads (a power of two: a
// warp or part of one for rows up to 128 vectors, else up to 512 threads)
// owns a row, loads it once into registers in 16-byte vectors (at most 4 per
// thread), reduces with warp shuffles (and shared memory across warps), and
// writes the output from the registers. Blocks hold 512 threads, so several
// rows each. Padded rows are neither read nor computed: their outputs,
// statistics and gradients are written 0. Weights at an offset that breaks
// the 16-byte vectors (views into a flat parameter) are copied first. Backward runs one wave of
// persistent blocks; each sums its rows' weight and bias gradients into one
// (D,) partial, and the partials are then summed over blocks in a fixed
// order: deterministic. Rows longer than 4 * 512 vectors (16384 bf16 values)
// go to the generic kernels (../generic/row_norm_kernel.cpp).
#include "../kernels.h"
#include "cuda_utils.cuh"

namespace masknorm::cuda {
namespace {

constexpr int kMaxIters = 4;      // vectors per thread kept in registers
constexpr int kThreads = 512;     // per block at most: 128 registers per thread

// Threads per row (a power of two, up to a warp while rows have at most 128
// vectors), vectors per thread, and rows per block, for rows of `vectors`.
struct RowLaunch {
  int threads_x = 1, rows_per_block = 1, iters = 1;
  bool fits = true;
};

// Launch shape: the defaults, changeable for tuning (masknorm._C._cuda_row_norm_tuning).
struct RowTuning {
  // Measured best on an H100 (tools/cuda_tune.py) for bf16 and fp32 rows of 1024 and 4096.
  int iters = 2;           // preferred vectors per thread (more threads per row above it)
  int block_threads = 128; // threads per block when rows share blocks
};
RowTuning row_tuning[2];   // [forward, backward]

RowLaunch row_launch(int64_t vectors, const RowTuning& t) {
  RowLaunch l;
  int64_t tx = 1;
  while (tx < kThreads && tx * t.iters < vectors) tx *= 2;
  const int64_t iters = ceil_div(vectors, tx);
  l.fits = iters <= kMaxIters;
  l.iters = iters <= 1 ? 1 : iters <= 2 ? 2 : 4;
  l.threads_x = int(tx);
  l.rows_per_block = int(std::max<int64_t>(1, t.block_threads / tx));
  return l;
}

template <typename scalar_t>
struct ForwardParams {
  const scalar_t* x;
  const MaskByte* pad;
  const opmath_t<scalar_t>* weight;
  const opmath_t<scalar_t>* bias;
  scalar_t* y;
  opmath_t<scalar_t>* mean;
  opmath_t<scalar_t>* rstd;
  int64_t rows, D;
  opmath_t<scalar_t> eps;
  bool centered;
};

template <typename scalar_t, int VEC, int ITERS>
__global__ void __launch_bounds__(kThreads) row_norm_forward_kernel(const ForwardParams<scalar_t> p) {
  using acc_t = opmath_t<scalar_t>;
  __shared__ acc_t scratch[kThreads / 2];  // row_sum: 32 per row, rows of 64 threads or more
  const int64_t row = int64_t(blockIdx.x) * blockDim.y + threadIdx.y;
  const bool in_range = row < p.rows;
  const bool valid = in_range && !(p.pad != nullptr && p.pad[row]);
  const scalar_t* xr = p.x + row * p.D;
  acc_t v[ITERS][VEC];
  acc_t sum = 0;
#pragma unroll
  for (int it = 0; it < ITERS; ++it) {
    const int64_t col = (int64_t(it) * blockDim.x + threadIdx.x) * VEC;
    if (valid && col < p.D) {
      load<VEC>(xr + col, v[it]);
    } else {
#pragma unroll
      for (int i = 0; i < VEC; ++i) v[it][i] = 0;
    }
#pragma unroll
    for (int i = 0; i < VEC; ++i) sum += v[it][i];
  }
  const acc_t inv_d = acc_t(1) / acc_t(p.D);
  // Two passes over the registers: the mean, then squared deviations from it.
  const acc_t mean = p.centered ? row_sum(sum, scratch) * inv_d : acc_t(0);
  acc_t squares = 0;
#pragma unroll
  for (int it = 0; it < ITERS; ++it) {
    const int64_t col = (int64_t(it) * blockDim.x + threadIdx.x) * VEC;
    if (col < p.D) {
#pragma unroll
      for (int i = 0; i < VEC; ++i) {
        const acc_t d = v[it][i] - mean;
        squares += d * d;
      }
    }
  }
  const acc_t var = row_sum(squares, scratch) * inv_d;
  const acc_t rstd = valid ? acc_t(1) / sqrt(var + p.eps) : acc_t(0);
  if (in_range && threadIdx.x == 0) {
    if (p.mean != nullptr) p.mean[row] = valid ? mean : acc_t(0);
    p.rstd[row] = rstd;
  }
  if (!in_range) return;
  scalar_t* yr = p.y + row * p.D;
#pragma unroll
  for (int it = 0; it < ITERS; ++it) {
    const int64_t col = (int64_t(it) * blockDim.x + threadIdx.x) * VEC;
    if (col >= p.D) continue;
    if (!valid) {
      store_zero<VEC>(yr + col);
      continue;
    }
    acc_t w[VEC], b[VEC], out[VEC];
    if (p.weight != nullptr) load<VEC>(p.weight + col, w);
    if (p.bias != nullptr) load<VEC>(p.bias + col, b);
#pragma unroll
    for (int i = 0; i < VEC; ++i) {
      // Scalar math: y = (x - mean) * rstd * w + b
      acc_t y = (v[it][i] - mean) * rstd;
      if (p.weight != nullptr) y *= w[i];
      if (p.bias != nullptr) y += b[i];
      out[i] = y;
    }
    store<VEC>(yr + col, out);
  }
}

template <typename scalar_t>
struct BackwardParams {
  const scalar_t* dy;
  const scalar_t* x;
  const MaskByte* pad;
  const opmath_t<scalar_t>* mean;
  const opmath_t<scalar_t>* rstd;
  const opmath_t<scalar_t>* weight;
  scalar_t* dx;
  opmath_t<scalar_t>* dw_partial;  // (gridDim.x, D), or null
  opmath_t<scalar_t>* db_partial;  // (gridDim.x, D), or null
  int64_t rows, D;
  bool centered;
};

// With g = dy * w and xhat = (x - mean) * rstd, per valid row:
//   dx = rstd * (g - mean(g) - xhat * mean(g * xhat))   (RMS: no mean(g) term)
// and per block, over its valid rows: dw += dy * xhat, db += dy.
// x and dy are read twice (the second time from cache) rather than kept in
// registers across the row sums: registers decide how many rows are in flight.
template <typename scalar_t, int VEC, int ITERS>
__global__ void __launch_bounds__(kThreads) row_norm_backward_kernel(const BackwardParams<scalar_t> p) {
  using acc_t = opmath_t<scalar_t>;
  __shared__ acc_t scratch[kThreads / 2];
  extern __shared__ unsigned char shared_bytes[];
  acc_t dw[ITERS][VEC], db[ITERS][VEC];
#pragma unroll
  for (int it = 0; it < ITERS; ++it) {
#pragma unroll
    for (int i = 0; i < VEC; ++i) dw[it][i] = db[it][i] = 0;
  }
  // The weight of a thread's columns (re-read from cache, not kept: registers).
  const auto weight_of = [&](int64_t col, acc_t (&w)[VEC]) {
    if (p.weight != nullptr && col < p.D) {
      load<VEC>(p.weight + col, w);
    } else {
#pragma unroll
      for (int i = 0; i < VEC; ++i) w[i] = 1;
    }
  };
  const acc_t inv_d = acc_t(1) / acc_t(p.D);
  // Every thread of a block runs the same number of iterations (row_sum syncs).
  for (int64_t first = int64_t(blockIdx.x) * blockDim.y; first < p.rows; first += int64_t(gridDim.x) * blockDim.y) {
    const int64_t row = first + threadIdx.y;
    const bool in_range = row < p.rows;
    const bool valid = in_range && !(p.pad != nullptr && p.pad[row]);
    const acc_t mean = valid && p.centered ? p.mean[row] : acc_t(0);
    const acc_t rstd = valid ? p.rstd[row] : acc_t(0);
    // x and dy of the thread's columns (0 outside valid rows and columns).
    const auto load_row = [&](int it, acc_t (&xv)[VEC], acc_t (&dyv)[VEC]) {
      const int64_t col = (int64_t(it) * blockDim.x + threadIdx.x) * VEC;
      if (valid && col < p.D) {
        load<VEC>(p.x + row * p.D + col, xv);
        load<VEC>(p.dy + row * p.D + col, dyv);
      } else {
#pragma unroll
        for (int i = 0; i < VEC; ++i) xv[i] = dyv[i] = 0;
      }
    };
    acc_t xs[ITERS][VEC], dys[ITERS][VEC];
#pragma unroll
    for (int it = 0; it < ITERS; ++it) load_row(it, xs[it], dys[it]);  // all loads in flight first
    acc_t sum_g = 0, sum_gx = 0;
#pragma unroll
    for (int it = 0; it < ITERS; ++it) {
      acc_t w[VEC];
      weight_of((int64_t(it) * blockDim.x + threadIdx.x) * VEC, w);
#pragma unroll
      for (int i = 0; i < VEC; ++i) {
        // Scalar math: xhat = (x - mean) * rstd; g = dy * w; sums over the row;
        //              dw += dy * xhat; db += dy  (dy is 0 outside valid rows)
        const acc_t dyv = dys[it][i];
        const acc_t xhat = (xs[it][i] - mean) * rstd;
        const acc_t g = mul_rn(dyv, w[i]);
        sum_g += g;
        sum_gx += g * xhat;
        dw[it][i] += dyv * xhat;
        db[it][i] += dyv;
      }
    }
    if (p.dx == nullptr) continue;
    const acc_t c_g = p.centered ? -row_sum(sum_g, scratch) * inv_d : acc_t(0);
    const acc_t c_x = -row_sum(sum_gx, scratch) * inv_d;
    if (!in_range) continue;
#pragma unroll
    for (int it = 0; it < ITERS; ++it) {
      const int64_t col = (int64_t(it) * blockDim.x + threadIdx.x) * VEC;
      if (col >= p.D) continue;
      if (!valid) {  // exact +0, whatever the weight holds (0 * inf is NaN, 0 * -w is -0)
        store_zero<VEC>(p.dx + row * p.D + col);
        continue;
      }
      // x and dy again, from cache: keeping them in registers across the
      // row sums would cost occupancy.
      acc_t out[VEC], w[VEC], xv[VEC], dyv[VEC];
      load_row(it, xv, dyv);
      weight_of(col, w);
#pragma unroll
      for (int i = 0; i < VEC; ++i) {
        // Scalar math: dx = rstd * (g + c_g + xhat * c_x)
        const acc_t xhat = (xv[i] - mean) * rstd;
        out[i] = rstd * (mul_rn(dyv[i], w[i]) + c_g + xhat * c_x);
      }
      store<VEC>(p.dx + row * p.D + col, out);
    }
  }
  if (p.dw_partial == nullptr && p.db_partial == nullptr) return;
  // The block's rows (threadIdx.y) summed in order through shared memory
  // (D values), then one (D,) partial per block.
  acc_t* column = reinterpret_cast<acc_t*>(shared_bytes);
  for (int which = 0; which < 2; ++which) {
    acc_t* partial = which == 0 ? p.dw_partial : p.db_partial;
    if (partial == nullptr) continue;
    acc_t(&acc)[ITERS][VEC] = which == 0 ? dw : db;
    partial += int64_t(blockIdx.x) * p.D;
    if (blockDim.y == 1) {
#pragma unroll
      for (int it = 0; it < ITERS; ++it) {
        const int64_t col = (int64_t(it) * blockDim.x + threadIdx.x) * VEC;
        if (col < p.D) store<VEC>(partial + col, acc[it]);
      }
      continue;
    }
    for (unsigned t = 0; t < blockDim.y; ++t) {
      __syncthreads();
      if (threadIdx.y != t) continue;
#pragma unroll
      for (int it = 0; it < ITERS; ++it) {
        const int64_t col = (int64_t(it) * blockDim.x + threadIdx.x) * VEC;
#pragma unroll
        for (int i = 0; i < VEC; ++i) {
          if (col + i < p.D) column[col + i] = t == 0 ? acc[it][i] : column[col + i] + acc[it][i];
        }
      }
    }
    __syncthreads();
    for (int64_t c = int64_t(threadIdx.y) * blockDim.x + threadIdx.x; c < p.D; c += int64_t(blockDim.x) * blockDim.y) {
      partial[c] = column[c];
    }
    __syncthreads();
  }
}

// out[c] = sum over b of partial[b][c]. A block of 32 columns x 16 threads:
// thread y sums blocks y, y + 16, ... and the 16 sums are added in order.
template <typename acc_t>
__global__ void sum_partials_kernel(const acc_t* partial, int64_t blocks, int64_t D, acc_t* out) {
  __shared__ acc_t sums[16][33];
  const int64_t c = int64_t(blockIdx.x) * 32 + threadIdx.x;
  acc_t total = 0;
  if (c < D) {
    for (int64_t b = threadIdx.y; b < blocks; b += 16) total += partial[b * D + c];
  }
  sums[threadIdx.y][threadIdx.x] = total;
  __syncthreads();
  if (threadIdx.y != 0 || c >= D) return;
  for (int y = 1; y < 16; ++y) total += sums[y][threadIdx.x];
  out[c] = total;
}

template <typename scalar_t, int VEC>
void forward_launch(const RowNormForwardArgs& a, const RowLaunch& l) {
  using acc_t = opmath_t<scalar_t>;
  const ForwardParams<scalar_t> p{
      a.input.const_data_ptr<scalar_t>(), mask_bytes(a.padding_mask), data_or_null<acc_t>(a.weight),
      data_or_null<acc_t>(a.bias), a.output.mutable_data_ptr<scalar_t>(), data_or_null<acc_t>(a.mean),
      a.rstd.mutable_data_ptr<acc_t>(), a.rows, a.width, acc_t(a.eps), a.centered};
  const dim3 block(l.threads_x, l.rows_per_block);
  const dim3 grid{static_cast<unsigned>(ceil_div(a.rows, l.rows_per_block))};
  switch (l.iters) {
    case 1: launch(row_norm_forward_kernel<scalar_t, VEC, 1>, grid, block, 0, p); break;
    case 2: launch(row_norm_forward_kernel<scalar_t, VEC, 2>, grid, block, 0, p); break;
    default: launch(row_norm_forward_kernel<scalar_t, VEC, 4>, grid, block, 0, p); break;
  }
}

template <typename scalar_t, int VEC>
void backward_launch(const RowNormBackwardArgs& a, const RowLaunch& l) {
  using acc_t = opmath_t<scalar_t>;
  const bool columns = a.grad_weight.defined() || a.grad_bias.defined();
  const int64_t row_groups = ceil_div(a.rows, l.rows_per_block);
  // One wave of blocks; each then owns a strided set of rows (and one partial).
  const int64_t blocks = std::min<int64_t>(
      row_groups, int64_t(multiprocessors()) * 2048 / (int64_t(l.threads_x) * l.rows_per_block));
  at::Tensor partial;
  if (columns) partial = at::empty({2, blocks, a.width}, a.rstd.options());
  const BackwardParams<scalar_t> p{
      a.grad_output.const_data_ptr<scalar_t>(), a.input.const_data_ptr<scalar_t>(), mask_bytes(a.padding_mask),
      data_or_null<acc_t>(a.mean), a.rstd.const_data_ptr<acc_t>(), data_or_null<acc_t>(a.weight),
      data_or_null<scalar_t>(a.grad_input),
      a.grad_weight.defined() ? partial[0].mutable_data_ptr<acc_t>() : nullptr,
      a.grad_bias.defined() ? partial[1].mutable_data_ptr<acc_t>() : nullptr, a.rows, a.width, a.centered};
  const dim3 block(l.threads_x, l.rows_per_block);
  const size_t shared = columns && l.rows_per_block > 1 ? size_t(a.width) * sizeof(acc_t) : 0;
  switch (l.iters) {
    case 1: launch(row_norm_backward_kernel<scalar_t, VEC, 1>, dim3(static_cast<unsigned>(blocks)), block, shared, p); break;
    case 2: launch(row_norm_backward_kernel<scalar_t, VEC, 2>, dim3(static_cast<unsigned>(blocks)), block, shared, p); break;
    default: launch(row_norm_backward_kernel<scalar_t, VEC, 4>, dim3(static_cast<unsigned>(blocks)), block, shared, p); break;
  }
  for (int which = 0; which < 2; ++which) {
    const at::Tensor& out = which == 0 ? a.grad_weight : a.grad_bias;
    if (!out.defined()) continue;
    launch(sum_partials_kernel<acc_t>, dim3(static_cast<unsigned>(ceil_div(a.width, 32))), dim3(32, 16), 0,
           partial[which].const_data_ptr<acc_t>(), blocks, a.width, out.mutable_data_ptr<acc_t>());
  }
}

}  // namespace

void set_row_norm_tuning(bool backward, int iters, int block_threads) {
  TORCH_CHECK(iters == 1 || iters == 2 || iters == 4, "iters must be 1, 2 or 4");
  TORCH_CHECK(block_threads >= 32 && block_threads <= kThreads, "block_threads must be in [32, 512]");
  row_tuning[backward] = {iters, block_threads};
}

void row_norm_forward(const RowNormForwardArgs& args) {
  if (args.rows == 0) return;
  const c10::cuda::CUDAGuard guard(args.input.device());
  RowNormForwardArgs a = args;
  a.weight = aligned16(args.weight);
  a.bias = aligned16(args.bias);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, a.input.scalar_type(), "masknorm_row_norm_forward_cuda", [&] {
    using acc_t = opmath_t<scalar_t>;
    constexpr int V = kVec<scalar_t>;
    const bool vec = vector_ok<scalar_t>(
        a.width, {a.input.const_data_ptr(), a.output.const_data_ptr(), data_or_null<acc_t>(a.weight),
                  data_or_null<acc_t>(a.bias)});
    const RowLaunch l = row_launch(vec ? a.width / V : a.width, row_tuning[0]);
    if (!l.fits) return generic::row_norm_forward(a);
    if (vec) {
      forward_launch<scalar_t, V>(a, l);
    } else {
      forward_launch<scalar_t, 1>(a, l);
    }
  });
}

void row_norm_backward(const RowNormBackwardArgs& args) {
  if (args.rows == 0) {
    if (args.grad_weight.defined()) args.grad_weight.zero_();
    if (args.grad_bias.defined()) args.grad_bias.zero_();
    return;
  }
  const c10::cuda::CUDAGuard guard(args.input.device());
  RowNormBackwardArgs a = args;
  a.weight = aligned16(args.weight);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, a.input.scalar_type(), "masknorm_row_norm_backward_cuda", [&] {
    using acc_t = opmath_t<scalar_t>;
    constexpr int V = kVec<scalar_t>;
    const bool vec = vector_ok<scalar_t>(
        a.width, {a.input.const_data_ptr(), a.grad_output.const_data_ptr(), data_or_null<scalar_t>(a.grad_input),
                  data_or_null<acc_t>(a.weight)});
    const RowLaunch l = row_launch(vec ? a.width / V : a.width, row_tuning[1]);
    if (!l.fits) return generic::row_norm_backward(a);
    if (vec) {
      backward_launch<scalar_t, V>(a, l);
    } else {
      backward_launch<scalar_t, 1>(a, l);
    }
  });
}

}  // namespace masknorm::cuda
