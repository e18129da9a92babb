// CPU loops of layer norm and RMS norm (kernels.h: RowNormForwardArgs,
// RowNormBackwardArgs; the op is ../row_norm.cpp). RMS norm is layer norm
// with the mean fixed at 0 (`centered = false`) and no bias, so both run
// these two loops. Padded rows are skipped: output 0, statistics 0, gradient
// 0, and nothing stored in them is read.
#include "isa_select.h"
#include "norm_utils.h"

#include <utility>

namespace masknorm::cpu {
namespace {

template <typename scalar_t>
at::opmath_type<scalar_t> mean_of_squares(const scalar_t* x, int64_t len) {
  using IO = VecIO<scalar_t>;
  using fVec = typename IO::fVec;
  constexpr int64_t V = IO::size();
  fVec acc0(0), acc1(0);
  int64_t i = 0;
  for (; i + 2 * V <= len; i += 2 * V) {
    const fVec a = IO::load(x + i), b = IO::load(x + i + V);
    acc0 = at::vec::fmadd(a, a, acc0);
    acc1 = at::vec::fmadd(b, b, acc1);
  }
  vec_loop<V>(len - i, [&](int64_t j, int64_t n) {
    const fVec a = IO::load(x + i + j, n);  // tail lanes load as 0
    acc0 = at::vec::fmadd(a, a, acc0);
  });
  return sum_lanes(acc0 + acc1) / at::opmath_type<scalar_t>(len);
}

// The per-row loops are functions of their own so that their pointers are
// locals: captured by reference from parallel_for's lambda they would be
// reloaded after every vector store (which may alias anything).

// y = (x - mean) * rstd * w + b over one row of D values (w, b may be null);
// with kStream, an aligned row is written with streaming stores.
template <bool kStream, typename scalar_t>
void normalize_row(
    const at::opmath_type<scalar_t>* x, int64_t D, at::opmath_type<scalar_t> mean, at::opmath_type<scalar_t> rstd,
    const at::opmath_type<scalar_t>* w, const at::opmath_type<scalar_t>* b, scalar_t* y) {
  using IO = VecIO<scalar_t>;
  using fVec = typename IO::fVec;
  const fVec mean_v(mean), rstd_v(rstd);
  const bool stream = kStream && StreamIO<scalar_t>::aligned(y);
  vec_loop<IO::size()>(D, [&](int64_t d, int64_t k) {
    // Scalar math: y = (x - mean) * rstd * w + b
    fVec v = (fVec::loadu(x + d, k) - mean_v) * rstd_v;
    if (w) v = v * fVec::loadu(w + d, k);
    if (b) v = v + fVec::loadu(b + d, k);
    store_row_vector<kStream>(y + d, v, k, stream);
  });
}

// The first backward pass over one row, with g = dy * w and xhat = (x - mean)
// * rstd: dw += dy * xhat, db += dy (each may be null), and returns
// (sum g, sum g * xhat) when `sums` (dx is wanted).
template <typename scalar_t>
std::pair<at::opmath_type<scalar_t>, at::opmath_type<scalar_t>> row_gradient_sums(
    const scalar_t* dy, const scalar_t* x, int64_t D, at::opmath_type<scalar_t> mean, at::opmath_type<scalar_t> rstd,
    const at::opmath_type<scalar_t>* w, bool sums, at::opmath_type<scalar_t>* dw, at::opmath_type<scalar_t>* db) {
  using IO = VecIO<scalar_t>;
  using fVec = typename IO::fVec;
  const fVec mean_v(mean), rstd_v(rstd);
  fVec sum_g(0), sum_gx(0);
  vec_loop<IO::size()>(D, [&](int64_t d, int64_t k) {
    // Scalar math: xhat = (x - mean) * rstd; g = dy * w;
    //              sum_g += g; sum_gx += g * xhat; dw += dy * xhat; db += dy
    const fVec dyv = IO::load(dy + d, k);
    const fVec xhat = (IO::load(x + d, k) - mean_v) * rstd_v;
    if (dw) at::vec::fmadd(dyv, xhat, fVec::loadu(dw + d, k)).store(dw + d, k);
    if (db) (fVec::loadu(db + d, k) + dyv).store(db + d, k);
    if (sums) {
      const fVec g = w ? dyv * fVec::loadu(w + d, k) : dyv;  // tail lanes: 0
      sum_g += g;
      sum_gx = at::vec::fmadd(g, xhat, sum_gx);
    }
  });
  return {sum_lanes(sum_g), sum_lanes(sum_gx)};
}

// The second pass: dx = rstd * (g + c_g + xhat * c_x) over one row (with
// kStream, an aligned row is written with streaming stores).
template <bool kStream, typename scalar_t>
void row_gradient(
    const scalar_t* dy, const scalar_t* x, int64_t D, at::opmath_type<scalar_t> mean, at::opmath_type<scalar_t> rstd,
    const at::opmath_type<scalar_t>* w, at::opmath_type<scalar_t> c_g, at::opmath_type<scalar_t> c_x, scalar_t* dx) {
  using IO = VecIO<scalar_t>;
  using fVec = typename IO::fVec;
  const fVec mean_v(mean), rstd_v(rstd), c_g_v(c_g), c_x_v(c_x);
  const bool stream = kStream && StreamIO<scalar_t>::aligned(dx);
  vec_loop<IO::size()>(D, [&](int64_t d, int64_t k) {
    // Scalar math: dx = rstd * (g + c_g + xhat * c_x)
    const fVec dyv = IO::load(dy + d, k);
    const fVec g = w ? dyv * fVec::loadu(w + d, k) : dyv;
    const fVec xhat = (IO::load(x + d, k) - mean_v) * rstd_v;
    store_row_vector<kStream>(dx + d, rstd_v * at::vec::fmadd(xhat, c_x_v, g + c_g_v), k, stream);
  });
}

// out = (x - mean) * rstd * w + b per valid row; mean/rstd saved per row.
// w, b and mean_out may be null (no weight, no bias, RMS norm). Half types
// convert each row once (RowScratch); the passes then read floats. Outputs
// of kStreamingBytes and more are written with streaming stores (each row
// is in cache while it is read; its output is not read again here).
template <typename scalar_t>
void row_norm_forward_loop(
    bool centered, const scalar_t* x, const MaskByte* pad, int64_t rows, int64_t D,
    const at::opmath_type<scalar_t>* w, const at::opmath_type<scalar_t>* b, double eps,
    scalar_t* out, at::opmath_type<scalar_t>* mean_out, at::opmath_type<scalar_t>* rstd_out) {
  using IO = VecIO<scalar_t>;
  using opmath_t = typename IO::opmath_t;
  with_streaming<scalar_t>(rows * D, [&](auto streaming) {
    constexpr bool kStream = decltype(streaming)::value;
    at::parallel_for(0, rows, row_grain(D), [&](int64_t begin, int64_t end) {
      RowScratch<scalar_t> scratch(D);
      for (int64_t r = begin; r < end; ++r) {
        scalar_t* yr = out + r * D;
        if (pad && pad[r] != 0) {
          zero_span<kStream>(yr, D);
          if (mean_out) mean_out[r] = 0;
          rstd_out[r] = 0;
          continue;
        }
        const opmath_t* xr = scratch.as_opmath(x + r * D, D);
        opmath_t mean = 0, var;
        if (centered) {
          const auto m = row_moments<RowShift::kMean, opmath_t>(xr, nullptr, D, D);
          mean = opmath_t(m.mean);
          var = opmath_t(m.m2 / MergeT(D));
        } else {
          var = mean_of_squares(xr, D);
        }
        const opmath_t rstd = opmath_t(1) / std::sqrt(var + opmath_t(eps));
        if (mean_out) mean_out[r] = mean;
        rstd_out[r] = rstd;
        normalize_row<kStream>(xr, D, mean, rstd, w, b, yr);
      }
      if constexpr (kStream) stream_fence();
    });
  });
}

// With g = dy * w and xhat = (x - mean) * rstd, per valid row:
//   dx = rstd * (g - mean(g) - xhat * mean(g * xhat))     (centered)
//   dx = rstd * (g - xhat * mean(g * xhat))               (RMS)
// and over valid rows dw = sum(dy * xhat), db = sum(dy).
// dx, dw, db may each be null (not requested); w and mean may be null. Half
// types convert in each of the two passes: a float scratch copy of x and dy
// costs more traffic than it saves (docs/performance.md). A dx of
// kStreamingBytes and more is written with streaming stores.
template <typename scalar_t>
void row_norm_backward_loop(
    bool centered, const scalar_t* dy, const scalar_t* x, const MaskByte* pad, int64_t rows, int64_t D,
    const at::opmath_type<scalar_t>* mean, const at::opmath_type<scalar_t>* rstd,
    const at::opmath_type<scalar_t>* w, scalar_t* dx, at::opmath_type<scalar_t>* dw,
    at::opmath_type<scalar_t>* db) {
  using IO = VecIO<scalar_t>;
  using opmath_t = typename IO::opmath_t;
  const bool need_columns = dw || db;
  PerThreadBuffers<opmath_t> columns(need_columns ? D : 0, 2);
  const opmath_t inv_D = opmath_t(1) / opmath_t(D);
  with_streaming<scalar_t>(dx ? rows * D : 0, [&](auto streaming) {
    constexpr bool kStream = decltype(streaming)::value;
    at::parallel_for(0, rows, row_grain(D), [&](int64_t begin, int64_t end) {
      opmath_t* dw_local = dw ? columns.local(0) : nullptr;
      opmath_t* db_local = db ? columns.local(1) : nullptr;
      for (int64_t r = begin; r < end; ++r) {
        if (pad && pad[r] != 0) {
          if (dx) zero_span<kStream>(dx + r * D, D);
          continue;
        }
        const scalar_t* xr = x + r * D;
        const scalar_t* dyr = dy + r * D;
        const opmath_t mean_r = centered ? mean[r] : opmath_t(0);
        const auto [sum_g, sum_gx] = row_gradient_sums(dyr, xr, D, mean_r, rstd[r], w, dx != nullptr, dw_local, db_local);
        if (!dx) continue;
        const opmath_t c_g = centered ? -sum_g * inv_D : opmath_t(0);
        row_gradient<kStream>(dyr, xr, D, mean_r, rstd[r], w, c_g, -sum_gx * inv_D, dx + r * D);
      }
      if constexpr (kStream) stream_fence();
    });
  });
  if (dw) columns.sum_into(dw, 0);
  if (db) columns.sum_into(db, 1);
}

}  // namespace

void row_norm_forward(const RowNormForwardArgs& a) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, a.input.scalar_type(), "masknorm_row_norm_forward", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    row_norm_forward_loop<scalar_t>(
        a.centered, a.input.const_data_ptr<scalar_t>(), padding_bytes(a.padding_mask), a.rows, a.width,
        data_or_null<opmath_t>(a.weight), data_or_null<opmath_t>(a.bias), a.eps,
        a.output.mutable_data_ptr<scalar_t>(), data_or_null<opmath_t>(a.mean), a.rstd.mutable_data_ptr<opmath_t>());
  });
}

void row_norm_backward(const RowNormBackwardArgs& a) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, a.input.scalar_type(), "masknorm_row_norm_backward", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    row_norm_backward_loop<scalar_t>(
        a.centered, a.grad_output.const_data_ptr<scalar_t>(), a.input.const_data_ptr<scalar_t>(),
        padding_bytes(a.padding_mask), a.rows, a.width, data_or_null<opmath_t>(a.mean),
        a.rstd.const_data_ptr<opmath_t>(), data_or_null<opmath_t>(a.weight),
        data_or_null<scalar_t>(a.grad_input), data_or_null<opmath_t>(a.grad_weight),
        data_or_null<opmath_t>(a.grad_bias));
  });
}

}  // namespace masknorm::cpu
