// masknorm::batch_norm and batch_norm_backward, and the stages they are made
// of: batch_norm_stats, batch_norm_merge_stats, batch_norm_elemt,
// batch_norm_backward_reduce and batch_norm_backward_elemt (the pieces
// torch's nn.SyncBatchNorm is built from, with padding masks). Schemas, C++
// entry points, and the entries registered for every device: checks ->
// contiguous inputs and allocated outputs -> the device's kernels (kernels.h).
//
//   batch_norm (training) = stats -> merge_stats (one part; updates the
//                           running statistics) -> elemt
//   batch_norm (eval)     = elemt with the running statistics
//   batch_norm_backward   = backward_reduce -> backward_elemt
//   MaskedSyncBatchNorm   = the same stages with a collective between them
//                           (python/masknorm/distributed.py)
//
// Neighbours: checks.cpp (argument checks), cpu/batch_norm_kernel.cpp,
// cuda/batch_norm_kernel.cu, generic/batch_norm_kernel.cpp (kernels),
// autograd/norm_autograd.cpp (autograd), python/masknorm/_ops.py (fakes).
#include "masknorm/ops.h"

#include "checks.h"
#include "kernel_registry.h"
#include "kernels.h"
#include "library.h"
#include "tensor_utils.h"

#include <torch/library.h>

namespace masknorm {

// ------------------------------------------------------- C++ entry points

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm(
    const at::Tensor& input, const std::optional<at::Tensor>& padding_mask, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& running_mean,
    const std::optional<at::Tensor>& running_var, const std::optional<at::Tensor>& num_batches_tracked,
    bool training, std::optional<double> momentum, double eps, bool channels_last) {
  static const auto op = find_op<decltype(batch_norm)>("masknorm::batch_norm");
  return op.call(
      input, padding_mask, weight, bias, running_mean, running_var, num_batches_tracked, training, momentum, eps,
      channels_last);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_backward(
    const at::Tensor& grad_output, const at::Tensor& input, const std::optional<at::Tensor>& padding_mask,
    const std::optional<at::Tensor>& weight, const at::Tensor& save_mean, const at::Tensor& save_invstd,
    bool training, bool channels_last, std::array<bool, 3> output_mask) {
  static const auto op = find_op<decltype(batch_norm_backward)>("masknorm::batch_norm_backward");
  return op.call(grad_output, input, padding_mask, weight, save_mean, save_invstd, training, channels_last, output_mask);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_stats(
    const at::Tensor& input, const std::optional<at::Tensor>& padding_mask, bool channels_last) {
  static const auto op = find_op<decltype(batch_norm_stats)>("masknorm::batch_norm_stats");
  return op.call(input, padding_mask, channels_last);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_merge_stats(
    const at::Tensor& mean, const at::Tensor& m2, const at::Tensor& count,
    const std::optional<at::Tensor>& running_mean, const std::optional<at::Tensor>& running_var,
    const std::optional<at::Tensor>& num_batches_tracked, std::optional<double> momentum, double eps) {
  static const auto op = find_op<decltype(batch_norm_merge_stats)>("masknorm::batch_norm_merge_stats");
  return op.call(mean, m2, count, running_mean, running_var, num_batches_tracked, momentum, eps);
}

at::Tensor batch_norm_elemt(
    const at::Tensor& input, const std::optional<at::Tensor>& padding_mask, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, const at::Tensor& mean, const at::Tensor& invstd, bool channels_last) {
  static const auto op = find_op<decltype(batch_norm_elemt)>("masknorm::batch_norm_elemt");
  return op.call(input, padding_mask, weight, bias, mean, invstd, channels_last);
}

std::tuple<at::Tensor, at::Tensor> batch_norm_backward_reduce(
    const at::Tensor& grad_output, const at::Tensor& input, const std::optional<at::Tensor>& padding_mask,
    const at::Tensor& mean, const at::Tensor& invstd, bool channels_last) {
  static const auto op = find_op<decltype(batch_norm_backward_reduce)>("masknorm::batch_norm_backward_reduce");
  return op.call(grad_output, input, padding_mask, mean, invstd, channels_last);
}

at::Tensor batch_norm_backward_elemt(
    const at::Tensor& grad_output, const at::Tensor& input, const std::optional<at::Tensor>& padding_mask,
    const std::optional<at::Tensor>& weight, const at::Tensor& mean, const at::Tensor& invstd,
    const std::optional<at::Tensor>& sum_dy, const std::optional<at::Tensor>& sum_dy_xhat,
    const std::optional<at::Tensor>& count, bool channels_last) {
  static const auto op = find_op<decltype(batch_norm_backward_elemt)>("masknorm::batch_norm_backward_elemt");
  return op.call(grad_output, input, padding_mask, weight, mean, invstd, sum_dy, sum_dy_xhat, count, channels_last);
}

TORCH_LIBRARY_FRAGMENT(masknorm, m) {
  m.def(
      "batch_norm(Tensor input, Tensor? padding_mask, Tensor? weight, Tensor? bias, Tensor(a!)? running_mean, "
      "Tensor(b!)? running_var, Tensor(c!)? num_batches_tracked, bool training, float? momentum, float eps, "
      "bool channels_last) -> (Tensor output, Tensor save_mean, Tensor save_invstd)");
  m.def(
      "batch_norm_backward(Tensor grad_output, Tensor input, Tensor? padding_mask, Tensor? weight, "
      "Tensor save_mean, Tensor save_invstd, bool training, bool channels_last, bool[3] output_mask) "
      "-> (Tensor grad_input, Tensor grad_weight, Tensor grad_bias)");
  m.def(
      "batch_norm_stats(Tensor input, Tensor? padding_mask, bool channels_last) "
      "-> (Tensor mean, Tensor m2, Tensor count)");
  m.def(
      "batch_norm_merge_stats(Tensor mean, Tensor m2, Tensor count, Tensor(a!)? running_mean, "
      "Tensor(b!)? running_var, Tensor(c!)? num_batches_tracked, float? momentum, float eps) "
      "-> (Tensor mean, Tensor invstd, Tensor count)");
  m.def(
      "batch_norm_elemt(Tensor input, Tensor? padding_mask, Tensor? weight, Tensor? bias, Tensor mean, "
      "Tensor invstd, bool channels_last) -> Tensor");
  m.def(
      "batch_norm_backward_reduce(Tensor grad_output, Tensor input, Tensor? padding_mask, Tensor mean, "
      "Tensor invstd, bool channels_last) -> (Tensor sum_dy, Tensor sum_dy_xhat)");
  m.def(
      "batch_norm_backward_elemt(Tensor grad_output, Tensor input, Tensor? padding_mask, Tensor? weight, "
      "Tensor mean, Tensor invstd, Tensor? sum_dy, Tensor? sum_dy_xhat, Tensor? count, bool channels_last) "
      "-> Tensor");
}

// ---------------------------------------------------- the ops, any device

namespace {

using at::Tensor;

Tensor value_or_undefined(const std::optional<Tensor>& t) { return t.has_value() ? *t : Tensor(); }

// A checked batch-norm input, ready for the kernels.
struct Prepared {
  Tensor input, mask;  // contiguous
  BatchNormLayout layout;
  at::TensorOptions stat_options;  // the accumulation dtype on input's device
};

Prepared prepare(const Tensor& input, const std::optional<Tensor>& padding_mask, bool channels_last) {
  return {input.contiguous(), contiguous_mask(padding_mask), batch_norm_layout(input, channels_last),
          input.options().dtype(opmath_dtype(input))};
}

// Per-channel statistics as the kernels want them: contiguous, accumulation dtype.
Tensor stat_as_opmath(const Tensor& t, const Prepared& p) {
  return vector_as(t, p.layout.C, p.stat_options.dtype().toScalarType());
}

// grad_output as the kernels want it: contiguous, input's dtype.
Tensor prepare_grad_output(const Tensor& grad_output, const Prepared& p) {
  return grad_output.to(p.input.scalar_type()).contiguous();
}

// Counts as the kernels want them: int64, contiguous (counts gathered in a
// floating-point tensor are whole numbers: rounded, not truncated).
Tensor as_count(const Tensor& count) {
  return (at::isFloatingType(count.scalar_type()) ? count.round() : count).to(at::kLong).contiguous();
}

// The fields every elementwise and reduction kernel shares: the input, its
// mask and layout, and the statistics it is normalized with.
template <typename Args>
void set_input_and_stats(Args& a, const Prepared& p, const Tensor& mean, const Tensor& invstd) {
  a.input = p.input;
  a.padding_mask = p.mask;
  a.layout = p.layout;
  a.mean = stat_as_opmath(mean, p);
  a.invstd = stat_as_opmath(invstd, p);
}

std::tuple<Tensor, Tensor, Tensor> run_stats(const Prepared& p) {
  BatchNormStatsArgs a;
  a.input = p.input;
  a.padding_mask = p.mask;
  a.layout = p.layout;
  a.mean = at::empty({p.layout.C}, p.stat_options);
  a.m2 = at::empty({p.layout.C}, p.stat_options);
  a.count = at::empty({}, p.stat_options.dtype(at::kLong));
  kernels_for(p.input.device()).batch_norm_stats(a);
  return {a.mean, a.m2, a.count};
}

// Merges (P, C) statistics, updates the running statistics, and raises when
// the batch has a single valid value (nn.BatchNorm1d's error: its variance is
// undefined) where data checks run (kernel_registry.h: always on the CPU).
// Where they do not, such a batch normalizes to the bias and leaves the
// running statistics as they were.
std::tuple<Tensor, Tensor, Tensor> run_merge_stats(
    const char* op, const Tensor& part_mean, const Tensor& part_m2, const Tensor& part_count,
    const Tensor& running_mean, const Tensor& running_var, const Tensor& num_batches_tracked,
    std::optional<double> momentum, double eps) {
  BatchNormMergeStatsArgs a;
  a.parts = part_mean.size(0);
  a.C = part_mean.size(1);
  const auto options = part_mean.options();
  a.part_mean = part_mean.contiguous();
  a.part_m2 = part_m2.to(options).contiguous();
  // Counts gathered in a floating-point tensor are whole numbers (checked where
  // data checks run, check_count_values): round, not truncate, where unchecked.
  a.part_count = as_count(part_count);
  // Running statistics of another dtype (or strided) are updated through a
  // contiguous copy in the accumulation dtype, written back below.
  const auto as_opmath = [&](const Tensor& t) {
    return t.defined() && (t.scalar_type() != options.dtype().toScalarType() || !t.is_contiguous())
        ? t.to(options).contiguous() : t;
  };
  a.running_mean = as_opmath(running_mean);
  a.running_var = as_opmath(running_var);
  a.num_batches_tracked = num_batches_tracked;
  a.has_momentum = momentum.has_value();
  a.momentum = momentum.value_or(0.0);
  a.eps = eps;
  a.mean = at::empty({a.C}, options);
  a.invstd = at::empty({a.C}, options);
  a.count = at::empty({}, options.dtype(at::kLong));
  kernels_for(part_mean.device()).batch_norm_merge_stats(a);
  if (running_mean.defined() && !a.running_mean.is_same(running_mean)) running_mean.copy_(a.running_mean);
  if (running_var.defined() && !a.running_var.is_same(running_var)) running_var.copy_(a.running_var);
  if (data_checks_enabled(a.count.device())) {
    TORCH_CHECK_VALUE(
        a.count.item<int64_t>() != 1,
        op, ": expected more than 1 valid (non-padding) value per channel when training, got 1");
  }
  return {a.mean, a.invstd, a.count};
}

// Running statistics to normalize with (eval).
struct RunningStats {
  Tensor mean, var;
  double eps = 0;
};

// The normalization: with the given mean and invstd, or with `running`
// (eval), when the kernel also sets mean (a copy of running_mean) and
// invstd (1/sqrt(running_var + eps)) in the same call, so that eval runs no
// tensor ops of its own on small inputs. Returns the output and the
// statistics it used.
std::tuple<Tensor, Tensor, Tensor> run_elemt(
    const Prepared& p, const Tensor& mean, const Tensor& invstd, const std::optional<Tensor>& weight,
    const std::optional<Tensor>& bias, const std::optional<RunningStats>& running = std::nullopt) {
  BatchNormElemtArgs a;
  if (running) {
    a.input = p.input;
    a.padding_mask = p.mask;
    a.layout = p.layout;
    a.running_mean = stat_as_opmath(running->mean, p);
    a.running_var = stat_as_opmath(running->var, p);
    a.eps = running->eps;
    a.mean = at::empty({p.layout.C}, p.stat_options);
    a.invstd = at::empty({p.layout.C}, p.stat_options);
  } else {
    set_input_and_stats(a, p, mean, invstd);
  }
  a.weight = feature_as_opmath(weight, p.layout.C, p.input);
  a.bias = feature_as_opmath(bias, p.layout.C, p.input);
  a.output = at::empty_like(p.input, at::MemoryFormat::Contiguous);
  kernels_for(p.input.device()).batch_norm_elemt(a);
  return {a.output, a.mean, a.invstd};
}

// grad_output: prepared (prepare_grad_output).
std::tuple<Tensor, Tensor> run_backward_reduce(
    const Prepared& p, const Tensor& grad_output, const Tensor& mean, const Tensor& invstd) {
  BatchNormBackwardReduceArgs a;
  a.grad_output = grad_output;
  set_input_and_stats(a, p, mean, invstd);
  a.sum_dy = at::empty({p.layout.C}, p.stat_options);
  a.sum_dy_xhat = at::empty({p.layout.C}, p.stat_options);
  kernels_for(p.input.device()).batch_norm_backward_reduce(a);
  return {a.sum_dy, a.sum_dy_xhat};
}

// grad_output: prepared (prepare_grad_output).
Tensor run_backward_elemt(
    const Prepared& p, const Tensor& grad_output, const Tensor& mean, const Tensor& invstd,
    const std::optional<Tensor>& weight, const Tensor& sum_dy, const Tensor& sum_dy_xhat, const Tensor& count) {
  BatchNormBackwardElemtArgs a;
  a.grad_output = grad_output;
  set_input_and_stats(a, p, mean, invstd);
  a.weight = feature_as_opmath(weight, p.layout.C, p.input);
  if (sum_dy.defined()) {
    a.sum_dy = stat_as_opmath(sum_dy, p);
    a.sum_dy_xhat = stat_as_opmath(sum_dy_xhat, p);
    a.count = as_count(count.reshape({}));
  }
  a.grad_input = at::empty_like(p.input, at::MemoryFormat::Contiguous);
  kernels_for(p.input.device()).batch_norm_backward_elemt(a);
  return a.grad_input;
}

// Number of valid positions (the same for every channel), an int64 scalar on input's device.
Tensor valid_positions(const Prepared& p) {
  if (!p.mask.defined()) return at::scalar_tensor(p.layout.positions(), p.stat_options.dtype(at::kLong));
  return p.mask.numel() - p.mask.sum(at::kLong);
}

// ------------------------------------------------------------- the ops

std::tuple<Tensor, Tensor, Tensor> batch_norm_op(
    const Tensor& input, const std::optional<Tensor>& padding_mask, const std::optional<Tensor>& weight,
    const std::optional<Tensor>& bias, const std::optional<Tensor>& running_mean,
    const std::optional<Tensor>& running_var, const std::optional<Tensor>& num_batches_tracked, bool training,
    std::optional<double> momentum, double eps, bool channels_last) {
  constexpr const char* op = "masknorm::batch_norm";
  const Tensor rm = value_or_undefined(running_mean), rv = value_or_undefined(running_var);
  const Tensor nbt = value_or_undefined(num_batches_tracked);
  check_batch_norm_args(
      op, input, padding_mask, channels_last,
      {{"weight", value_or_undefined(weight)}, {"bias", value_or_undefined(bias)}, {"running_mean", rm},
       {"running_var", rv}});
  check_running_stats(op, rm, rv, nbt, input);
  const Prepared p = prepare(input, padding_mask, channels_last);
  Tensor mean, invstd;
  if (training) {
    check_eps(eps, op, "when training");
    check_running_stats_update(
        op, rm, rv, nbt, momentum,
        {{"input", input}, {"padding_mask", value_or_undefined(padding_mask)}, {"weight", value_or_undefined(weight)},
         {"bias", value_or_undefined(bias)}});
    auto [part_mean, part_m2, part_count] = run_stats(p);
    std::tie(mean, invstd, std::ignore) = run_merge_stats(
        op, part_mean.unsqueeze(0), part_m2.unsqueeze(0), part_count.reshape({1}), rm, rv, nbt, momentum, eps);
    // Without a mask the count is the shape's, as nn.BatchNorm1d checks it, so
    // devices without data checks raise too (after counting the batch, as
    // torch); where data checks run, run_merge_stats has raised on the count.
    TORCH_CHECK_VALUE(
        p.mask.defined() || p.layout.positions() != 1,
        op, ": expected more than 1 value per channel when training, got input of shape ", input.sizes());
  } else {
    check_eps(eps, op, "in eval", /*positive=*/false);
    TORCH_CHECK(rm.defined(), op, ": expected running_mean and running_var when training=False, but got None");
    return run_elemt(p, Tensor(), Tensor(), weight, bias, RunningStats{rm, rv, eps});
  }
  return {std::get<0>(run_elemt(p, mean, invstd, weight, bias)), mean, invstd};
}

std::tuple<Tensor, Tensor, Tensor> batch_norm_backward_op(
    const Tensor& grad_output, const Tensor& input, const std::optional<Tensor>& padding_mask,
    const std::optional<Tensor>& weight, const Tensor& save_mean, const Tensor& save_invstd, bool training,
    bool channels_last, std::array<bool, 3> output_mask) {
  check_batch_norm_backward_args(
      "masknorm::batch_norm_backward", grad_output, input, padding_mask, weight, save_mean, save_invstd,
      channels_last);
  const Prepared p = prepare(input, padding_mask, channels_last);
  const Tensor dy = prepare_grad_output(grad_output, p);  // once, for both stages
  Tensor sum_dy, sum_dy_xhat;
  if (output_mask[1] || output_mask[2] || (output_mask[0] && training)) {
    std::tie(sum_dy, sum_dy_xhat) = run_backward_reduce(p, dy, save_mean, save_invstd);
  }
  Tensor dx, dw, db;
  if (output_mask[0]) {
    dx = training ? run_backward_elemt(p, dy, save_mean, save_invstd, weight, sum_dy, sum_dy_xhat, valid_positions(p))
                  : run_backward_elemt(p, dy, save_mean, save_invstd, weight, Tensor(), Tensor(), Tensor());
  }
  const auto param_dtype = weight.has_value() && weight->defined() ? weight->scalar_type() : input.scalar_type();
  if (output_mask[1]) dw = sum_dy_xhat.to(param_dtype);
  if (output_mask[2]) db = sum_dy.to(param_dtype);
  return {dx, dw, db};
}

std::tuple<Tensor, Tensor, Tensor> batch_norm_stats_op(
    const Tensor& input, const std::optional<Tensor>& padding_mask, bool channels_last) {
  check_batch_norm_args("masknorm::batch_norm_stats", input, padding_mask, channels_last);
  return run_stats(prepare(input, padding_mask, channels_last));
}

std::tuple<Tensor, Tensor, Tensor> batch_norm_merge_stats_op(
    const Tensor& mean, const Tensor& m2, const Tensor& count, const std::optional<Tensor>& running_mean,
    const std::optional<Tensor>& running_var, const std::optional<Tensor>& num_batches_tracked,
    std::optional<double> momentum, double eps) {
  constexpr const char* op = "masknorm::batch_norm_merge_stats";
  check_given(op, {{"mean", mean}, {"m2", m2}, {"count", count}});
  TORCH_CHECK(
      mean.dim() == 2 && (mean.scalar_type() == at::kFloat || mean.scalar_type() == at::kDouble),
      op, ": expected mean to be a (parts, C) float32 or float64 tensor, but got dtype ", mean.scalar_type(),
      " and shape ", mean.sizes());
  TORCH_CHECK(
      m2.sizes() == mean.sizes() && at::isFloatingType(m2.scalar_type()) && m2.device() == mean.device(),
      op, ": expected m2 of mean's shape ", mean.sizes(), " and device ", mean.device(),
      ", floating point, but got dtype ", m2.scalar_type(), ", shape ", m2.sizes(), " on ", m2.device());
  check_count(count, "count", {mean.size(0)}, mean, op, /*allow_float=*/true);
  check_count_values(count, "count", op);
  const Tensor rm = value_or_undefined(running_mean), rv = value_or_undefined(running_var);
  const Tensor nbt = value_or_undefined(num_batches_tracked);
  check_feature_tensor(rm, "running_mean", {mean.size(1)}, mean, op);
  check_feature_tensor(rv, "running_var", {mean.size(1)}, mean, op);
  check_eps(eps, op, "");
  check_running_stats(op, rm, rv, nbt, mean);
  check_running_stats_update(op, rm, rv, nbt, momentum, {{"mean", mean}, {"m2", m2}, {"count", count}});
  return run_merge_stats(op, mean, m2, count, rm, rv, nbt, momentum, eps);
}

Tensor batch_norm_elemt_op(
    const Tensor& input, const std::optional<Tensor>& padding_mask, const std::optional<Tensor>& weight,
    const std::optional<Tensor>& bias, const Tensor& mean, const Tensor& invstd, bool channels_last) {
  check_given("masknorm::batch_norm_elemt", {{"input", input}, {"mean", mean}, {"invstd", invstd}});
  check_batch_norm_args(
      "masknorm::batch_norm_elemt", input, padding_mask, channels_last,
      {{"weight", value_or_undefined(weight)}, {"bias", value_or_undefined(bias)}, {"mean", mean},
       {"invstd", invstd}});
  return std::get<0>(run_elemt(prepare(input, padding_mask, channels_last), mean, invstd, weight, bias));
}

std::tuple<Tensor, Tensor> batch_norm_backward_reduce_op(
    const Tensor& grad_output, const Tensor& input, const std::optional<Tensor>& padding_mask, const Tensor& mean,
    const Tensor& invstd, bool channels_last) {
  constexpr const char* op = "masknorm::batch_norm_backward_reduce";
  check_given(op, {{"grad_output", grad_output}, {"input", input}, {"mean", mean}, {"invstd", invstd}});
  check_batch_norm_args(op, input, padding_mask, channels_last, {{"mean", mean}, {"invstd", invstd}});
  check_grad_output(grad_output, input, op);
  const Prepared p = prepare(input, padding_mask, channels_last);
  return run_backward_reduce(p, prepare_grad_output(grad_output, p), mean, invstd);
}

Tensor batch_norm_backward_elemt_op(
    const Tensor& grad_output, const Tensor& input, const std::optional<Tensor>& padding_mask,
    const std::optional<Tensor>& weight, const Tensor& mean, const Tensor& invstd,
    const std::optional<Tensor>& sum_dy, const std::optional<Tensor>& sum_dy_xhat,
    const std::optional<Tensor>& count, bool channels_last) {
  constexpr const char* op = "masknorm::batch_norm_backward_elemt";
  check_given(op, {{"grad_output", grad_output}, {"input", input}, {"mean", mean}, {"invstd", invstd}});
  const Tensor s1 = value_or_undefined(sum_dy), s2 = value_or_undefined(sum_dy_xhat), n = value_or_undefined(count);
  check_batch_norm_args(
      op, input, padding_mask, channels_last,
      {{"weight", value_or_undefined(weight)}, {"mean", mean}, {"invstd", invstd}, {"sum_dy", s1},
       {"sum_dy_xhat", s2}});
  check_grad_output(grad_output, input, op);
  TORCH_CHECK(
      s1.defined() == s2.defined() && s1.defined() == n.defined(),
      op, ": expected sum_dy, sum_dy_xhat and count all given (batch statistics) or all None (given statistics)");
  if (n.defined()) {
    check_count(n, "count", {}, input, op, /*allow_float=*/true);
    check_count_values(n, "count", op);
  }
  const Prepared p = prepare(input, padding_mask, channels_last);
  return run_backward_elemt(p, prepare_grad_output(grad_output, p), mean, invstd, weight, s1, s2, n);
}

}  // namespace

TORCH_LIBRARY_IMPL(masknorm, CompositeExplicitAutograd, m) {
  m.impl("batch_norm", &batch_norm_op);
  m.impl("batch_norm_backward", &batch_norm_backward_op);
  m.impl("batch_norm_stats", &batch_norm_stats_op);
  m.impl("batch_norm_merge_stats", &batch_norm_merge_stats_op);
  m.impl("batch_norm_elemt", &batch_norm_elemt_op);
  m.impl("batch_norm_backward_reduce", &batch_norm_backward_reduce_op);
  m.impl("batch_norm_backward_elemt", &batch_norm_backward_elemt_op);
}

}  // namespace masknorm
