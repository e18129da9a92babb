// CPU kernels of masknorm::batch_norm, batch_norm_backward and
// batch_norm_update_running_stats.
//
// Two memory layouts, one set of formulas:
//  - "channels inner": rows of C contiguous channels, one mask entry per row.
//    2-D (N, C) input, and 3-D (N, L, C) input with channels_last=True.
//  - "channels outer": (N, C, L) planes; the mask (N, L) selects positions
//    inside each contiguous row of L.
// Statistics come from two-pass moments of L2-sized chunks of rows, or
// corrected two-pass moments of each plane row, merged with Chan's formula;
// padded positions are skipped or cleared with a bit mask, never multiplied
// by zero, so NaN/inf there cannot leak.
#include "../checks.h"
#include "kernels.h"
#include "norm_utils.h"

namespace masknorm::cpu {
namespace {

using at::Tensor;

// ---------------------------------------------------------------- statistics

// Per-channel moments of rows of C channels. Rows are taken in chunks small
// enough to stay in L2: a two-pass (mean, then squared deviations) over each
// chunk, merged into the thread's running moments with Chan's formula,
// vectorized over channels. Far fewer operations per element than a
// per-row Welford update, and as stable on data with a large offset.
template <typename scalar_t>
void moments_channels_inner(
    const scalar_t* x, const bool* pad, int64_t rows, int64_t C,
    at::opmath_type<scalar_t>* mean_out, at::opmath_type<scalar_t>* var_out) {
  using IO = VecIO<scalar_t>;
  using opmath_t = typename IO::opmath_t;
  using fVec = typename IO::fVec;
  constexpr int64_t V = IO::size();
  const int64_t chunk_rows = std::max<int64_t>(1, (256 * 1024) / (C * int64_t(sizeof(scalar_t))));
  // Per thread: running mean and m2, and the current chunk's mean and m2.
  PerThreadBuffers<opmath_t> partial(C, 4);
  std::vector<int64_t> seen(partial.threads(), 0);
  at::parallel_for(0, rows, row_grain(C), [&](int64_t begin, int64_t end) {
    opmath_t* mean = partial.local(0);
    opmath_t* m2 = partial.local(1);
    opmath_t* chunk_mean = partial.local(2);
    opmath_t* chunk_m2 = partial.local(3);
    int64_t& n = seen[at::get_thread_num()];
    for (int64_t first = begin; first < end; first += chunk_rows) {
      const int64_t last = std::min(end, first + chunk_rows);
      const int64_t k = pad ? count_valid(pad + first, last - first) : last - first;
      if (k == 0) continue;
      std::fill(chunk_mean, chunk_mean + C, opmath_t(0));
      std::fill(chunk_m2, chunk_m2 + C, opmath_t(0));
      for (int64_t r = first; r < last; ++r) {
        if (pad && pad[r]) continue;
        vec_loop<V>(C, [&](int64_t c, int64_t w) {
          (fVec::loadu(chunk_mean + c, w) + IO::load(x + r * C + c, w)).store(chunk_mean + c, w);
        });
      }
      const fVec inv_k(opmath_t(1) / opmath_t(k));
      vec_loop<V>(C, [&](int64_t c, int64_t w) { (fVec::loadu(chunk_mean + c, w) * inv_k).store(chunk_mean + c, w); });
      for (int64_t r = first; r < last; ++r) {
        if (pad && pad[r]) continue;
        vec_loop<V>(C, [&](int64_t c, int64_t w) {
          // Scalar math: d = x - chunk_mean; chunk_m2 += d * d
          const fVec d = IO::load(x + r * C + c, w) - fVec::loadu(chunk_mean + c, w);
          at::vec::fmadd(d, d, fVec::loadu(chunk_m2 + c, w)).store(chunk_m2 + c, w);
        });
      }
      // Scalar math: delta = chunk_mean - mean; f = k / (n + k);
      //              mean += delta * f; m2 += chunk_m2 + delta^2 * n * f
      const fVec f(opmath_t(k) / opmath_t(n + k)), nf(opmath_t(n) * opmath_t(k) / opmath_t(n + k));
      vec_loop<V>(C, [&](int64_t c, int64_t w) {
        const fVec mv = fVec::loadu(mean + c, w);
        const fVec delta = fVec::loadu(chunk_mean + c, w) - mv;
        at::vec::fmadd(delta, f, mv).store(mean + c, w);
        at::vec::fmadd(delta * delta, nf, fVec::loadu(m2 + c, w) + fVec::loadu(chunk_m2 + c, w)).store(m2 + c, w);
      });
      n += k;
    }
  });
  for (int64_t c = 0; c < C; ++c) {
    Moments<opmath_t> acc;
    for (int64_t t = 0; t < partial.threads(); ++t) {
      acc.merge({seen[t], partial.of_thread(t, 0)[c], partial.of_thread(t, 1)[c]});
    }
    mean_out[c] = acc.mean;
    var_out[c] = acc.count > 0 ? acc.m2 / opmath_t(acc.count) : opmath_t(0);
  }
}

template <typename scalar_t>
void moments_channels_outer(
    const scalar_t* x, const MaskLanes<at::opmath_type<scalar_t>>* lanes, int64_t N, int64_t C,
    int64_t L, at::opmath_type<scalar_t>* mean_out, at::opmath_type<scalar_t>* var_out) {
  using opmath_t = at::opmath_type<scalar_t>;
  // Moments of every (n, c) row, visited in memory order (prefetch-friendly),
  // then merged per channel in order of n: the same result for any thread count.
  std::vector<Moments<opmath_t>> rows(static_cast<size_t>(N * C));
  at::parallel_for(0, N * C, row_grain(L), [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t n = row / C;
      const int64_t valid = lanes ? lanes->valid[n] : L;
      if (valid == 0) continue;
      rows[row] = row_moments<scalar_t>(x + row * L, lanes ? lanes->keep.data() + n * L : nullptr, L, valid);
    }
  });
  for (int64_t c = 0; c < C; ++c) {
    Moments<opmath_t> acc;
    for (int64_t n = 0; n < N; ++n) acc.merge(rows[n * C + c]);
    mean_out[c] = acc.mean;
    var_out[c] = acc.count > 0 ? acc.m2 / opmath_t(acc.count) : opmath_t(0);
  }
}

// ------------------------------------------------------------------- forward

// out = (x - mean) * alpha + beta at valid positions, 0 at padding.
template <typename scalar_t>
void normalize(
    const BatchNormLayout& g, const scalar_t* x, const bool* pad,
    const MaskLanes<at::opmath_type<scalar_t>>* lanes, const at::opmath_type<scalar_t>* mean,
    const at::opmath_type<scalar_t>* alpha, const at::opmath_type<scalar_t>* beta, scalar_t* out) {
  using IO = VecIO<scalar_t>;
  using fVec = typename IO::fVec;
  constexpr int64_t V = IO::size();
  const int64_t C = g.C;
  if (g.channels_inner) {
    at::parallel_for(0, g.rows(), row_grain(C), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        if (pad && pad[r]) { fill_zero(out + r * C, C); continue; }
        vec_loop<V>(C, [&](int64_t c, int64_t k) {
          // Scalar math: out = (x - mean) * alpha + beta
          const fVec y = at::vec::fmadd(
              IO::load(x + r * C + c, k) - fVec::loadu(mean + c, k), fVec::loadu(alpha + c, k),
              fVec::loadu(beta + c, k));
          IO::store(out + r * C + c, y, k);
        });
      }
    });
    return;
  }
  const int64_t L = g.L;
  at::parallel_for(0, g.N * C, row_grain(L), [&](int64_t begin, int64_t end) {
    for (int64_t plane = begin; plane < end; ++plane) {
      const int64_t n = plane / C, c = plane % C;
      const scalar_t* xr = x + plane * L;
      scalar_t* yr = out + plane * L;
      if (lanes && lanes->valid[n] == 0) { fill_zero(yr, L); continue; }
      const auto* keep = lanes ? lanes->keep.data() + n * L : nullptr;
      const fVec m(mean[c]), a(alpha[c]), b(beta[c]);
      vec_loop<V>(L, [&](int64_t l, int64_t k) {
        // Scalar math: out = valid ? (x - mean) * alpha + beta : 0
        fVec y = at::vec::fmadd(IO::load(xr + l, k) - m, a, b);
        if (keep) y = y & fVec::loadu(keep + l, k);
        IO::store(yr + l, y, k);
      });
    }
  });
}

}  // namespace

std::tuple<Tensor, Tensor, Tensor, Tensor> batch_norm_forward_cpu(
    const Tensor& input_, const std::optional<Tensor>& padding_mask,
    const std::optional<Tensor>& weight, const std::optional<Tensor>& bias,
    const std::optional<Tensor>& running_mean, const std::optional<Tensor>& running_var,
    bool training, double eps, bool channels_last) {
  const BatchNormLayout g = check_batch_norm_args(
      "masknorm::batch_norm", input_, padding_mask, weight, bias, running_mean, running_var,
      channels_last);
  TORCH_CHECK_VALUE(
      !training || eps > 0,
      "masknorm::batch_norm: expected eps > 0 when training (as torch.nn.BatchNorm1d), but got ", eps);
  TORCH_CHECK(
      training || (running_mean.has_value() && running_mean->defined() && running_var.has_value() &&
                   running_var->defined()),
      "masknorm::batch_norm: expected running_mean and running_var when training=False, but got None");
  const Tensor input = input_.contiguous();
  const Tensor mask = contiguous_mask(padding_mask);
  const bool* pad = mask.defined() ? mask.const_data_ptr<bool>() : nullptr;
  const auto stat_options = input.options().dtype(opmath_dtype(input));
  Tensor output = at::empty_like(input, at::MemoryFormat::Contiguous);
  Tensor save_mean = at::empty({g.C}, stat_options);
  Tensor save_invstd = at::empty({g.C}, stat_options);
  int64_t count = 0;

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, input.scalar_type(), "masknorm_batch_norm", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    const scalar_t* x = input.const_data_ptr<scalar_t>();
    std::optional<MaskLanes<opmath_t>> lanes;
    if (pad && !g.channels_inner) lanes.emplace(pad, g.N, g.L);
    count = lanes ? lanes->total : count_valid(pad, g.rows());
    opmath_t* mean = save_mean.mutable_data_ptr<opmath_t>();
    opmath_t* invstd = save_invstd.mutable_data_ptr<opmath_t>();
    if (training) {
      TORCH_CHECK_VALUE(
          count != 1,
          "masknorm::batch_norm: expected more than 1 valid (non-padding) value per channel when "
          "training, got 1 (input shape ", input.sizes(), ")");
      std::vector<opmath_t> var(g.C);
      if (g.channels_inner) {
        moments_channels_inner<scalar_t>(x, pad, g.rows(), g.C, mean, var.data());
      } else {
        moments_channels_outer<scalar_t>(x, lanes ? &*lanes : nullptr, g.N, g.C, g.L, mean, var.data());
      }
      for (int64_t c = 0; c < g.C; ++c) {
        // No valid value: invstd 0 makes every output and gradient 0.
        invstd[c] = count > 0 ? opmath_t(1) / std::sqrt(var[c] + opmath_t(eps)) : opmath_t(0);
      }
    } else {
      const Tensor rm = feature_as_opmath(running_mean, g.C, input, 0.0);
      const Tensor rv = feature_as_opmath(running_var, g.C, input, 1.0);
      const opmath_t* rmp = rm.const_data_ptr<opmath_t>();
      const opmath_t* rvp = rv.const_data_ptr<opmath_t>();
      for (int64_t c = 0; c < g.C; ++c) {
        mean[c] = rmp[c];
        invstd[c] = opmath_t(1) / std::sqrt(rvp[c] + opmath_t(eps));
      }
    }
    const Tensor w = feature_as_opmath(weight, g.C, input, 1.0);
    const Tensor b = feature_as_opmath(bias, g.C, input, 0.0);
    const opmath_t* wp = w.const_data_ptr<opmath_t>();
    std::vector<opmath_t> alpha(g.C);
    for (int64_t c = 0; c < g.C; ++c) alpha[c] = wp[c] * invstd[c];
    normalize<scalar_t>(
        g, x, pad, lanes ? &*lanes : nullptr, mean, alpha.data(), b.const_data_ptr<opmath_t>(),
        output.mutable_data_ptr<scalar_t>());
  });
  return {output, save_mean, save_invstd, at::scalar_tensor(count, input.options().dtype(at::kLong))};
}

// ------------------------------------------------------------------ backward

namespace {

// Per channel over valid positions: sum(dy) and sum(dy * (x - mean)).
template <typename scalar_t>
void grad_sums(
    const BatchNormLayout& g, const scalar_t* dy, const scalar_t* x, const bool* pad,
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
        if (pad && pad[r]) continue;
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

// dx = dy * a + (x - mean) * b + k at valid positions, 0 at padding.
template <typename scalar_t>
void grad_input(
    const BatchNormLayout& g, const scalar_t* dy, const scalar_t* x, const bool* pad,
    const MaskLanes<at::opmath_type<scalar_t>>* lanes, const at::opmath_type<scalar_t>* mean,
    const at::opmath_type<scalar_t>* a, const at::opmath_type<scalar_t>* b,
    const at::opmath_type<scalar_t>* k0, scalar_t* dx) {
  using IO = VecIO<scalar_t>;
  using fVec = typename IO::fVec;
  constexpr int64_t V = IO::size();
  const int64_t C = g.C;
  if (g.channels_inner) {
    at::parallel_for(0, g.rows(), row_grain(C), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        if (pad && pad[r]) { fill_zero(dx + r * C, C); continue; }
        vec_loop<V>(C, [&](int64_t c, int64_t k) {
          // Scalar math: dx = dy * a + (x - mean) * b + k0
          const fVec xm = IO::load(x + r * C + c, k) - fVec::loadu(mean + c, k);
          const fVec v = at::vec::fmadd(
              IO::load(dy + r * C + c, k), fVec::loadu(a + c, k),
              at::vec::fmadd(xm, fVec::loadu(b + c, k), fVec::loadu(k0 + c, k)));
          IO::store(dx + r * C + c, v, k);
        });
      }
    });
    return;
  }
  const int64_t L = g.L;
  at::parallel_for(0, g.N * C, row_grain(L), [&](int64_t begin, int64_t end) {
    for (int64_t plane = begin; plane < end; ++plane) {
      const int64_t n = plane / C, c = plane % C;
      if (lanes && lanes->valid[n] == 0) { fill_zero(dx + plane * L, L); continue; }
      const auto* keep = lanes ? lanes->keep.data() + n * L : nullptr;
      const fVec m(mean[c]), av(a[c]), bv(b[c]), kv(k0[c]);
      vec_loop<V>(L, [&](int64_t l, int64_t k) {
        // Scalar math: dx = valid ? dy * a + (x - mean) * b + k0 : 0
        fVec v = at::vec::fmadd(
            IO::load(dy + plane * L + l, k), av,
            at::vec::fmadd(IO::load(x + plane * L + l, k) - m, bv, kv));
        if (keep) v = v & fVec::loadu(keep + l, k);
        IO::store(dx + plane * L + l, v, k);
      });
    }
  });
}

}  // namespace

std::tuple<Tensor, Tensor, Tensor> batch_norm_backward_cpu(
    const Tensor& grad_output_, const Tensor& input_, const std::optional<Tensor>& padding_mask,
    const std::optional<Tensor>& weight, const Tensor& save_mean, const Tensor& save_invstd,
    bool training, bool channels_last, std::array<bool, 3> output_mask) {
  const BatchNormLayout g = check_batch_norm_backward_args(
      grad_output_, input_, padding_mask, weight, save_mean, save_invstd, channels_last);
  const Tensor input = input_.contiguous();
  const Tensor grad_output = grad_output_.to(input.scalar_type()).contiguous();
  const Tensor mask = contiguous_mask(padding_mask);
  const bool* pad = mask.defined() ? mask.const_data_ptr<bool>() : nullptr;
  const auto stat_options = input.options().dtype(opmath_dtype(input));
  const Tensor mean_t = save_mean.to(stat_options).contiguous();
  const Tensor invstd_t = save_invstd.to(stat_options).contiguous();
  const Tensor w = feature_as_opmath(weight, g.C, input, 1.0);
  const auto param_dtype = weight.has_value() && weight->defined() ? weight->scalar_type() : input.scalar_type();

  Tensor dx, dw, db;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, input.scalar_type(), "masknorm_batch_norm_backward", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    const scalar_t* x = input.const_data_ptr<scalar_t>();
    const scalar_t* dy = grad_output.const_data_ptr<scalar_t>();
    const opmath_t* mean = mean_t.const_data_ptr<opmath_t>();
    const opmath_t* invstd = invstd_t.const_data_ptr<opmath_t>();
    const opmath_t* wp = w.const_data_ptr<opmath_t>();
    std::optional<MaskLanes<opmath_t>> lanes;
    if (pad && !g.channels_inner) lanes.emplace(pad, g.N, g.L);
    const int64_t count = lanes ? lanes->total : count_valid(pad, g.rows());

    const bool need_sums = output_mask[1] || output_mask[2] || (output_mask[0] && training);
    Tensor sum_dy = at::zeros({g.C}, stat_options), sum_dy_xmu = at::zeros({g.C}, stat_options);
    opmath_t* s1 = sum_dy.mutable_data_ptr<opmath_t>();
    opmath_t* s2 = sum_dy_xmu.mutable_data_ptr<opmath_t>();
    if (need_sums) grad_sums<scalar_t>(g, dy, x, pad, lanes ? &*lanes : nullptr, mean, s1, s2);

    if (output_mask[0]) {
      dx = at::empty_like(input, at::MemoryFormat::Contiguous);
      std::vector<opmath_t> a(g.C), b(g.C, 0), k0(g.C, 0);
      for (int64_t c = 0; c < g.C; ++c) {
        a[c] = wp[c] * invstd[c];
        if (training && count > 0) {
          // dx = w * invstd * (dy - mean(dy) - (x - mean) * invstd^2 * mean(dy * (x - mean)))
          const opmath_t inv_n = opmath_t(1) / opmath_t(count);
          b[c] = -a[c] * invstd[c] * invstd[c] * s2[c] * inv_n;
          k0[c] = -a[c] * s1[c] * inv_n;
        }
      }
      grad_input<scalar_t>(
          g, dy, x, pad, lanes ? &*lanes : nullptr, mean, a.data(), b.data(), k0.data(),
          dx.mutable_data_ptr<scalar_t>());
    }
    if (output_mask[1]) dw = (sum_dy_xmu * invstd_t).to(param_dtype);
    if (output_mask[2]) db = sum_dy.to(param_dtype);
  });
  return {dx, dw, db};
}

// ------------------------------------------------------------ running stats

void batch_norm_update_running_stats_cpu(
    Tensor& running_mean, Tensor& running_var, const Tensor& save_mean, const Tensor& save_invstd,
    const Tensor& count, double eps, std::optional<double> momentum,
    const std::optional<Tensor>& num_batches_tracked) {
  check_running_stats_update_args(
      running_mean, running_var, save_mean, save_invstd, count, momentum, num_batches_tracked);
  const int64_t n = count.item<int64_t>();
  if (n == 0) return;  // nothing valid in the batch: keep the running statistics
  double factor;
  if (momentum.has_value()) {
    factor = *momentum;
  } else {
    const double batches = num_batches_tracked->item<double>();
    TORCH_CHECK(
        batches >= 1,
        "masknorm::batch_norm_update_running_stats: expected num_batches_tracked >= 1 when momentum "
        "is None (cumulative average; increment it before the update), but got ", batches);
    factor = 1.0 / batches;
  }
  const auto stat_options = save_mean.options().dtype(at::kDouble);
  const Tensor invstd = save_invstd.to(stat_options);
  // Biased batch variance recovered from invstd = 1/sqrt(var + eps); running
  // statistics keep the unbiased one, as torch.nn.BatchNorm1d does.
  const Tensor var = (invstd.pow(-2) - eps).clamp_min(0);
  const Tensor unbiased = n > 1 ? var * (double(n) / double(n - 1)) : var;
  running_mean.copy_(running_mean.to(at::kDouble) * (1.0 - factor) + save_mean.to(stat_options) * factor);
  running_var.copy_(running_var.to(at::kDouble) * (1.0 - factor) + unbiased * factor);
}

}  // namespace masknorm::cpu
