// masknorm::group_norm, group_norm_backward and instance_norm: schemas, C++
// entry points, and the entries registered for every device (checks ->
// contiguous inputs and allocated outputs -> the device's group_norm_forward /
// group_norm_backward kernel, kernels.h). Statistics are per (sample, group)
// over the group's channels at the sample's valid positions. Instance norm is
// group norm with one group per channel, plus nn.InstanceNorm1d's running
// statistics; its backward is group_norm_backward. Inputs take the batch-norm
// layouts: (N, C), (N, C, L), or (N, L, C) with channels_last.
// Neighbours: checks.cpp (argument checks), cpu/group_norm_kernel.cpp,
// cuda/group_norm_kernel.cu, generic/group_norm_kernel.cpp (kernels),
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

std::tuple<at::Tensor, at::Tensor, at::Tensor> group_norm(
    const at::Tensor& input, const std::optional<at::Tensor>& padding_mask, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, int64_t num_groups, double eps, bool channels_last) {
  static const auto op = find_op<decltype(group_norm)>("masknorm::group_norm");
  return op.call(input, padding_mask, weight, bias, num_groups, eps, channels_last);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> group_norm_backward(
    const at::Tensor& grad_output, const at::Tensor& input, const std::optional<at::Tensor>& padding_mask,
    const std::optional<at::Tensor>& weight, const at::Tensor& mean, const at::Tensor& rstd, int64_t num_groups,
    bool channels_last, std::array<bool, 3> output_mask) {
  static const auto op = find_op<decltype(group_norm_backward)>("masknorm::group_norm_backward");
  return op.call(grad_output, input, padding_mask, weight, mean, rstd, num_groups, channels_last, output_mask);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> instance_norm(
    const at::Tensor& input, const std::optional<at::Tensor>& padding_mask, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& running_mean,
    const std::optional<at::Tensor>& running_var, double momentum, double eps, bool channels_last) {
  static const auto op = find_op<decltype(instance_norm)>("masknorm::instance_norm");
  return op.call(input, padding_mask, weight, bias, running_mean, running_var, momentum, eps, channels_last);
}

TORCH_LIBRARY_FRAGMENT(masknorm, m) {
  m.def(
      "group_norm(Tensor input, Tensor? padding_mask, Tensor? weight, Tensor? bias, int num_groups, float eps, "
      "bool channels_last) -> (Tensor output, Tensor mean, Tensor rstd)");
  m.def(
      "group_norm_backward(Tensor grad_output, Tensor input, Tensor? padding_mask, Tensor? weight, Tensor mean, "
      "Tensor rstd, int num_groups, bool channels_last, bool[3] output_mask) "
      "-> (Tensor grad_input, Tensor grad_weight, Tensor grad_bias)");
  m.def(
      "instance_norm(Tensor input, Tensor? padding_mask, Tensor? weight, Tensor? bias, Tensor(a!)? running_mean, "
      "Tensor(b!)? running_var, float momentum, float eps, bool channels_last) "
      "-> (Tensor output, Tensor mean, Tensor rstd)");
}

// ---------------------------------------------------- the ops, any device

namespace {

using at::Tensor;

Tensor value_or_undefined(const std::optional<Tensor>& t) { return t.has_value() ? *t : Tensor(); }

// Runs the device's forward kernel on checked arguments. Running statistics
// of another dtype (or strided) are updated through a contiguous copy in the
// accumulation dtype, written back.
std::tuple<Tensor, Tensor, Tensor> run_forward(
    const Tensor& input, const std::optional<Tensor>& padding_mask, const std::optional<Tensor>& weight,
    const std::optional<Tensor>& bias, int64_t groups, double eps, bool channels_last, const Tensor& running_mean,
    const Tensor& running_var, double momentum) {
  GroupNormForwardArgs a;
  a.input = input.contiguous();
  a.padding_mask = contiguous_mask(padding_mask);
  a.layout = batch_norm_layout(input, channels_last);
  a.groups = groups;
  a.weight = feature_as_opmath(weight, a.layout.C, input);
  a.bias = feature_as_opmath(bias, a.layout.C, input);
  a.eps = eps;
  const auto stat_options = input.options().dtype(opmath_dtype(input));
  const auto as_opmath = [&](const Tensor& t) {
    return t.defined() && (t.scalar_type() != opmath_dtype(input) || !t.is_contiguous())
        ? t.to(stat_options).contiguous() : t;
  };
  a.running_mean = as_opmath(running_mean);
  a.running_var = as_opmath(running_var);
  a.momentum = momentum;
  a.output = at::empty_like(a.input, at::MemoryFormat::Contiguous);
  a.mean = at::empty({a.layout.N, groups}, stat_options);
  a.rstd = at::empty({a.layout.N, groups}, stat_options);
  kernels_for(input.device()).group_norm_forward(a);
  if (running_mean.defined() && !a.running_mean.is_same(running_mean)) running_mean.copy_(a.running_mean);
  if (running_var.defined() && !a.running_var.is_same(running_var)) running_var.copy_(a.running_var);
  return {a.output, a.mean, a.rstd};
}

std::tuple<Tensor, Tensor, Tensor> group_norm_op(
    const Tensor& input, const std::optional<Tensor>& padding_mask, const std::optional<Tensor>& weight,
    const std::optional<Tensor>& bias, int64_t num_groups, double eps, bool channels_last) {
  constexpr const char* op = "masknorm::group_norm";
  check_group_norm_args(
      op, input, padding_mask, num_groups, channels_last,
      {{"weight", value_or_undefined(weight)}, {"bias", value_or_undefined(bias)}});
  check_eps(eps, op, "", /*positive=*/false);
  return run_forward(input, padding_mask, weight, bias, num_groups, eps, channels_last, Tensor(), Tensor(), 0.0);
}

std::tuple<Tensor, Tensor, Tensor> group_norm_backward_op(
    const Tensor& grad_output, const Tensor& input, const std::optional<Tensor>& padding_mask,
    const std::optional<Tensor>& weight, const Tensor& mean, const Tensor& rstd, int64_t num_groups,
    bool channels_last, std::array<bool, 3> output_mask) {
  check_group_norm_backward_args(
      "masknorm::group_norm_backward", grad_output, input, padding_mask, weight, mean, rstd, num_groups,
      channels_last);
  GroupNormBackwardArgs a;
  a.input = input.contiguous();
  a.grad_output = grad_output.to(input.scalar_type()).contiguous();
  a.padding_mask = contiguous_mask(padding_mask);
  a.layout = batch_norm_layout(input, channels_last);
  a.groups = num_groups;
  const auto stat_options = input.options().dtype(opmath_dtype(input));
  a.mean = mean.to(stat_options).contiguous();
  a.rstd = rstd.to(stat_options).contiguous();
  a.weight = feature_as_opmath(weight, a.layout.C, input);
  if (output_mask[0]) a.grad_input = at::empty_like(a.input, at::MemoryFormat::Contiguous);
  if (output_mask[1]) a.grad_weight = at::empty({a.layout.C}, stat_options);
  if (output_mask[2]) a.grad_bias = at::empty({a.layout.C}, stat_options);
  kernels_for(input.device()).group_norm_backward(a);
  const auto param_dtype = weight.has_value() && weight->defined() ? weight->scalar_type() : input.scalar_type();
  const auto as_param = [&](const Tensor& g) { return g.defined() ? g.to(param_dtype) : g; };
  return {a.grad_input, as_param(a.grad_weight), as_param(a.grad_bias)};
}

std::tuple<Tensor, Tensor, Tensor> instance_norm_op(
    const Tensor& input, const std::optional<Tensor>& padding_mask, const std::optional<Tensor>& weight,
    const std::optional<Tensor>& bias, const std::optional<Tensor>& running_mean,
    const std::optional<Tensor>& running_var, double momentum, double eps, bool channels_last) {
  constexpr const char* op = "masknorm::instance_norm";
  const Tensor rm = value_or_undefined(running_mean), rv = value_or_undefined(running_var);
  check_instance_norm_args(op, input, padding_mask, channels_last);
  const int64_t C = batch_norm_layout(input, channels_last).C;
  check_group_norm_args(
      op, input, padding_mask, /*num_groups=*/C, channels_last,
      {{"weight", value_or_undefined(weight)}, {"bias", value_or_undefined(bias)}, {"running_mean", rm},
       {"running_var", rv}});
  check_running_stats(op, rm, rv, Tensor(), input);
  check_running_stats_update(
      op, rm, rv, Tensor(), momentum,
      {{"input", input}, {"padding_mask", value_or_undefined(padding_mask)}, {"weight", value_or_undefined(weight)},
       {"bias", value_or_undefined(bias)}});
  check_eps(eps, op, "", /*positive=*/false);
  return run_forward(input, padding_mask, weight, bias, C, eps, channels_last, rm, rv, momentum);
}

}  // namespace

TORCH_LIBRARY_IMPL(masknorm, CompositeExplicitAutograd, m) {
  m.impl("group_norm", &group_norm_op);
  m.impl("group_norm_backward", &group_norm_backward_op);
  m.impl("instance_norm", &instance_norm_op);
}

}  // namespace masknorm
