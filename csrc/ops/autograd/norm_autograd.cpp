// Autograd of the masknorm ops, registered for the Autograd key so Python and
// C++ callers get gradients alike.
//  - batch_norm, layer_norm, rms_norm, group_norm, instance_norm: one
//    autograd Function (NormFunction) whose backward calls the op's backward
//    op; each norm supplies its forward call, what it saves (by name) and
//    where its gradients go.
//  - batch_norm_backward, layer_norm_backward, rms_norm_backward,
//    group_norm_backward (instance norm's too): their kernels, or, when a
//    graph must be recorded through them (double backward), the
//    differentiable composite of differentiable_backward.h.
//  - the batch-norm stages (batch_norm_stats, ...): not differentiable
//    themselves (MaskedSyncBatchNorm wraps them in its own autograd
//    Function); torch's not-implemented fallback raises if asked.
// The ops mutating their arguments (batch_norm, batch_norm_merge_stats,
// instance_norm) get torch's ADInplaceOrView fallback, which bumps the
// version counters of the running statistics.
#include "differentiable_backward.h"

#include "../checks.h"
#include "masknorm/ops.h"

#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>
#include <torch/library.h>

#include <array>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

namespace masknorm {
namespace {

using at::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// What every norm saves for backward, in one order (as SavedVariables:
// version checks apply); undefined where a norm has none (no mask, no
// weight, RMS norm's mean). Positions, not names: backward runs per step.
struct SavedTensors {
  Tensor input, padding_mask, weight, mean, rstd;
};
void save_tensors(
    AutogradContext* ctx, const Tensor& input, const std::optional<Tensor>& padding_mask,
    const std::optional<Tensor>& weight, const Tensor& mean, const Tensor& rstd) {
  ctx->save_for_backward({input, padding_mask.value_or(Tensor()), weight.value_or(Tensor()), mean, rstd});
}
SavedTensors saved_tensors(AutogradContext* ctx) {
  variable_list v = ctx->get_saved_variables();
  return {std::move(v[0]), std::move(v[1]), std::move(v[2]), std::move(v[3]), std::move(v[4])};
}

std::optional<Tensor> maybe(const Tensor& t) { return t.defined() ? std::optional<Tensor>(t) : std::nullopt; }
bool wants_grad(const std::optional<Tensor>& t) { return t.has_value() && t->defined() && t->requires_grad(); }

// Which gradients backward computes (input, weight, bias), saved by forward.
void save_output_mask(
    AutogradContext* ctx, const Tensor& input, const std::optional<Tensor>& weight, const std::optional<Tensor>& bias) {
  ctx->saved_data["output_mask"] =
      int64_t(input.requires_grad()) | int64_t(wants_grad(weight)) << 1 | int64_t(wants_grad(bias)) << 2;
}
std::array<bool, 3> saved_output_mask(AutogradContext* ctx) {
  const int64_t bits = ctx->saved_data["output_mask"].toInt();
  return {(bits & 1) != 0, (bits & 2) != 0, (bits & 4) != 0};
}

template <typename Norm, typename = void>
struct HasBias : std::false_type {};
template <typename Norm>
struct HasBias<Norm, std::void_t<decltype(Norm::kBias)>> : std::true_type {};

// The argument positions a Norm writes by hand (kArguments, kInput, kWeight,
// kBias), checked once against its op's schema (kOp): a schema change that
// moves an argument fails here instead of sending a gradient to the wrong
// argument.
template <typename Norm>
void check_argument_positions() {
  static const bool checked = [] {
    const auto& args = c10::Dispatcher::singleton().findSchemaOrThrow(Norm::kOp, "").schema().arguments();
    TORCH_INTERNAL_ASSERT(args.size() == Norm::kArguments, Norm::kOp, ": autograd expects ", Norm::kArguments,
                          " arguments, the schema has ", args.size());
    const auto expect = [&args](size_t position, const char* name) {
      TORCH_INTERNAL_ASSERT(args[position].name() == name, Norm::kOp, ": autograd expects ", name, " at position ",
                            position, ", the schema has ", args[position].name());
    };
    expect(Norm::kInput, "input");
    expect(Norm::kWeight, "weight");
    if constexpr (HasBias<Norm>::value) expect(Norm::kBias, "bias");
    return true;
  }();
  (void)checked;
}

// The autograd Function of the norms. `Norm` supplies
//   kOp, kArguments, kInput, kWeight (and kBias): the op, how many arguments
//     it takes (one gradient slot each) and where its gradients go, checked
//     against the schema by check_argument_positions
//   forward(ctx, args...): calls the op, saves what backward needs
//   backward(ctx, grad_output, grads): calls the backward op, fills grads
template <typename Norm>
class NormFunction : public torch::autograd::Function<NormFunction<Norm>> {
 public:
  template <typename... Args>
  static variable_list forward(AutogradContext* ctx, const Args&... args) {
    static_assert(sizeof...(Args) == Norm::kArguments, "one gradient slot per argument of the op");
    check_argument_positions<Norm>();
    // The op's own kernel, below autograd; ADInplaceOrView still runs
    // (version counters of mutated running statistics).
    at::AutoDispatchBelowAutograd guard;
    // No zeros made for the statistics' gradients (never used): backward
    // reads the output's gradient only, undefined when it is zero.
    ctx->set_materialize_grads(false);
    return Norm::forward(ctx, args...);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    variable_list grads(Norm::kArguments);
    if (grad_outputs[0].defined()) Norm::backward(ctx, grad_outputs[0], grads);
    return grads;
  }
};

// ------------------------------------------------------------------ batch norm

struct BatchNorm {
  static constexpr const char* kOp = "masknorm::batch_norm";
  enum : size_t { kInput = 0, kWeight = 2, kBias = 3, kArguments = 11 };

  static variable_list forward(
      AutogradContext* ctx, const Tensor& input, const std::optional<Tensor>& padding_mask,
      const std::optional<Tensor>& weight, const std::optional<Tensor>& bias,
      const std::optional<Tensor>& running_mean, const std::optional<Tensor>& running_var,
      const std::optional<Tensor>& num_batches_tracked, bool training, std::optional<double> momentum, double eps,
      bool channels_last) {
    auto [output, save_mean, save_invstd] = batch_norm(
        input, padding_mask, weight, bias, running_mean, running_var, num_batches_tracked, training, momentum, eps,
        channels_last);
    save_tensors(ctx, input, padding_mask, weight, save_mean, save_invstd);
    ctx->saved_data["training"] = training;
    ctx->saved_data["channels_last"] = channels_last;
    save_output_mask(ctx, input, weight, bias);
    ctx->mark_non_differentiable({save_mean, save_invstd});
    return {output, save_mean, save_invstd};
  }

  static void backward(AutogradContext* ctx, const Tensor& grad_output, variable_list& grads) {
    const SavedTensors saved = saved_tensors(ctx);
    std::tie(grads[kInput], grads[kWeight], grads[kBias]) = batch_norm_backward(
        grad_output, saved.input, maybe(saved.padding_mask), maybe(saved.weight), saved.mean, saved.rstd,
        ctx->saved_data["training"].toBool(), ctx->saved_data["channels_last"].toBool(),
        saved_output_mask(ctx));
  }
};

// ------------------------------------------------------------ layer / RMS norm

struct LayerNorm {
  static constexpr const char* kOp = "masknorm::layer_norm";
  enum : size_t { kInput = 0, kWeight = 3, kBias = 4, kArguments = 6 };

  static variable_list forward(
      AutogradContext* ctx, const Tensor& input, at::IntArrayRef normalized_shape,
      const std::optional<Tensor>& padding_mask, const std::optional<Tensor>& weight,
      const std::optional<Tensor>& bias, double eps) {
    auto [output, mean, rstd] = layer_norm(input, normalized_shape, padding_mask, weight, bias, eps);
    save_tensors(ctx, input, padding_mask, weight, mean, rstd);
    ctx->saved_data["normalized_shape"] = normalized_shape.vec();
    save_output_mask(ctx, input, weight, bias);
    ctx->mark_non_differentiable({mean, rstd});
    return {output, mean, rstd};
  }

  static void backward(AutogradContext* ctx, const Tensor& grad_output, variable_list& grads) {
    const SavedTensors saved = saved_tensors(ctx);
    std::tie(grads[kInput], grads[kWeight], grads[kBias]) = layer_norm_backward(
        grad_output, saved.input, ctx->saved_data["normalized_shape"].toIntVector(), maybe(saved.padding_mask),
        saved.mean, saved.rstd, maybe(saved.weight),
        saved_output_mask(ctx));
  }
};

struct RMSNorm {
  static constexpr const char* kOp = "masknorm::rms_norm";
  enum : size_t { kInput = 0, kWeight = 3, kArguments = 5 };

  static variable_list forward(
      AutogradContext* ctx, const Tensor& input, at::IntArrayRef normalized_shape,
      const std::optional<Tensor>& padding_mask, const std::optional<Tensor>& weight, std::optional<double> eps) {
    auto [output, rstd] = rms_norm(input, normalized_shape, padding_mask, weight, eps);
    save_tensors(ctx, input, padding_mask, weight, /*mean=*/Tensor(), rstd);
    ctx->saved_data["normalized_shape"] = normalized_shape.vec();
    save_output_mask(ctx, input, weight, std::nullopt);
    ctx->mark_non_differentiable({rstd});
    return {output, rstd};
  }

  static void backward(AutogradContext* ctx, const Tensor& grad_output, variable_list& grads) {
    const SavedTensors saved = saved_tensors(ctx);
    const auto mask = saved_output_mask(ctx);
    std::tie(grads[kInput], grads[kWeight]) = rms_norm_backward(
        grad_output, saved.input, ctx->saved_data["normalized_shape"].toIntVector(), maybe(saved.padding_mask),
        saved.rstd, maybe(saved.weight), {mask[0], mask[1]});
  }
};

// ------------------------------------------------------ group / instance norm

// Group and instance norm save the same tensors and share group_norm_backward
// (instance norm: one group per channel).
void save_group_norm(
    AutogradContext* ctx, const Tensor& input, const std::optional<Tensor>& padding_mask,
    const std::optional<Tensor>& weight, const std::optional<Tensor>& bias, const Tensor& mean, const Tensor& rstd,
    int64_t num_groups, bool channels_last) {
  save_tensors(ctx, input, padding_mask, weight, mean, rstd);
  ctx->saved_data["num_groups"] = num_groups;
  ctx->saved_data["channels_last"] = channels_last;
  save_output_mask(ctx, input, weight, bias);
  ctx->mark_non_differentiable({mean, rstd});
}

std::tuple<Tensor, Tensor, Tensor> group_norm_backward_of(AutogradContext* ctx, const Tensor& grad_output) {
  const SavedTensors saved = saved_tensors(ctx);
  return group_norm_backward(
      grad_output, saved.input, maybe(saved.padding_mask), maybe(saved.weight), saved.mean, saved.rstd,
      ctx->saved_data["num_groups"].toInt(), ctx->saved_data["channels_last"].toBool(),
      saved_output_mask(ctx));
}

struct GroupNorm {
  static constexpr const char* kOp = "masknorm::group_norm";
  enum : size_t { kInput = 0, kWeight = 2, kBias = 3, kArguments = 7 };

  static variable_list forward(
      AutogradContext* ctx, const Tensor& input, const std::optional<Tensor>& padding_mask,
      const std::optional<Tensor>& weight, const std::optional<Tensor>& bias, int64_t num_groups, double eps,
      bool channels_last) {
    auto [output, mean, rstd] = group_norm(input, padding_mask, weight, bias, num_groups, eps, channels_last);
    save_group_norm(ctx, input, padding_mask, weight, bias, mean, rstd, num_groups, channels_last);
    return {output, mean, rstd};
  }

  static void backward(AutogradContext* ctx, const Tensor& grad_output, variable_list& grads) {
    std::tie(grads[kInput], grads[kWeight], grads[kBias]) = group_norm_backward_of(ctx, grad_output);
  }
};

struct InstanceNorm {
  static constexpr const char* kOp = "masknorm::instance_norm";
  enum : size_t { kInput = 0, kWeight = 2, kBias = 3, kArguments = 9 };

  static variable_list forward(
      AutogradContext* ctx, const Tensor& input, const std::optional<Tensor>& padding_mask,
      const std::optional<Tensor>& weight, const std::optional<Tensor>& bias,
      const std::optional<Tensor>& running_mean, const std::optional<Tensor>& running_var, double momentum,
      double eps, bool channels_last) {
    auto [output, mean, rstd] =
        instance_norm(input, padding_mask, weight, bias, running_mean, running_var, momentum, eps, channels_last);
    // One group per channel. (sym_size: the other sizes may be symbolic
    // while tracing, and sizes() would fix them.)
    const int64_t channels = mean.sym_size(1).guard_int(__FILE__, __LINE__);
    save_group_norm(ctx, input, padding_mask, weight, bias, mean, rstd, channels, channels_last);
    return {output, mean, rstd};
  }

  static void backward(AutogradContext* ctx, const Tensor& grad_output, variable_list& grads) {
    std::tie(grads[kInput], grads[kWeight], grads[kBias]) = group_norm_backward_of(ctx, grad_output);
  }
};

// ------------------------------------------------- the Autograd-key kernels

// Without a graph to record (no_grad, inference, nothing requiring grad) the
// forward ops skip the autograd Function: no node, nothing saved.

std::tuple<Tensor, Tensor, Tensor> batch_norm_autograd(
    const Tensor& input, const std::optional<Tensor>& padding_mask, const std::optional<Tensor>& weight,
    const std::optional<Tensor>& bias, const std::optional<Tensor>& running_mean,
    const std::optional<Tensor>& running_var, const std::optional<Tensor>& num_batches_tracked, bool training,
    std::optional<double> momentum, double eps, bool channels_last) {
  check_given("masknorm::batch_norm", {{"input", input}});  // before autograd reads it
  if (!records_graph({input, weight.value_or(Tensor()), bias.value_or(Tensor())})) {
    at::AutoDispatchBelowAutograd guard;
    return batch_norm(
        input, padding_mask, weight, bias, running_mean, running_var, num_batches_tracked, training, momentum, eps,
        channels_last);
  }
  auto out = NormFunction<BatchNorm>::apply(
      input, padding_mask, weight, bias, running_mean, running_var, num_batches_tracked, training, momentum, eps,
      channels_last);
  return {out[0], out[1], out[2]};
}

std::tuple<Tensor, Tensor, Tensor> layer_norm_autograd(
    const Tensor& input, at::IntArrayRef normalized_shape, const std::optional<Tensor>& padding_mask,
    const std::optional<Tensor>& weight, const std::optional<Tensor>& bias, double eps) {
  check_given("masknorm::layer_norm", {{"input", input}});
  if (!records_graph({input, weight.value_or(Tensor()), bias.value_or(Tensor())})) {
    at::AutoDispatchBelowAutograd guard;
    return layer_norm(input, normalized_shape, padding_mask, weight, bias, eps);
  }
  auto out = NormFunction<LayerNorm>::apply(input, normalized_shape, padding_mask, weight, bias, eps);
  return {out[0], out[1], out[2]};
}

std::tuple<Tensor, Tensor> rms_norm_autograd(
    const Tensor& input, at::IntArrayRef normalized_shape, const std::optional<Tensor>& padding_mask,
    const std::optional<Tensor>& weight, std::optional<double> eps) {
  check_given("masknorm::rms_norm", {{"input", input}});
  if (!records_graph({input, weight.value_or(Tensor())})) {
    at::AutoDispatchBelowAutograd guard;
    return rms_norm(input, normalized_shape, padding_mask, weight, eps);
  }
  auto out = NormFunction<RMSNorm>::apply(input, normalized_shape, padding_mask, weight, eps);
  return {out[0], out[1]};
}

std::tuple<Tensor, Tensor, Tensor> group_norm_autograd(
    const Tensor& input, const std::optional<Tensor>& padding_mask, const std::optional<Tensor>& weight,
    const std::optional<Tensor>& bias, int64_t num_groups, double eps, bool channels_last) {
  check_given("masknorm::group_norm", {{"input", input}});
  if (!records_graph({input, weight.value_or(Tensor()), bias.value_or(Tensor())})) {
    at::AutoDispatchBelowAutograd guard;
    return group_norm(input, padding_mask, weight, bias, num_groups, eps, channels_last);
  }
  auto out = NormFunction<GroupNorm>::apply(input, padding_mask, weight, bias, num_groups, eps, channels_last);
  return {out[0], out[1], out[2]};
}

std::tuple<Tensor, Tensor, Tensor> instance_norm_autograd(
    const Tensor& input, const std::optional<Tensor>& padding_mask, const std::optional<Tensor>& weight,
    const std::optional<Tensor>& bias, const std::optional<Tensor>& running_mean,
    const std::optional<Tensor>& running_var, double momentum, double eps, bool channels_last) {
  check_given("masknorm::instance_norm", {{"input", input}});
  if (!records_graph({input, weight.value_or(Tensor()), bias.value_or(Tensor())})) {
    at::AutoDispatchBelowAutograd guard;
    return instance_norm(input, padding_mask, weight, bias, running_mean, running_var, momentum, eps, channels_last);
  }
  auto out = NormFunction<InstanceNorm>::apply(
      input, padding_mask, weight, bias, running_mean, running_var, momentum, eps, channels_last);
  return {out[0], out[1], out[2]};
}

// The backward ops: their kernels, unless a graph must be recorded through
// them; then the differentiable composite (after the op's own checks).

std::tuple<Tensor, Tensor, Tensor> batch_norm_backward_autograd(
    const Tensor& grad_output, const Tensor& input, const std::optional<Tensor>& padding_mask,
    const std::optional<Tensor>& weight, const Tensor& save_mean, const Tensor& save_invstd, bool training,
    bool channels_last, std::array<bool, 3> output_mask) {
  if (!records_graph({grad_output, input, weight.value_or(Tensor()), save_mean, save_invstd})) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return batch_norm_backward(
        grad_output, input, padding_mask, weight, save_mean, save_invstd, training, channels_last, output_mask);
  }
  constexpr const char* op = "masknorm::batch_norm_backward";
  check_batch_norm_backward_args(op, grad_output, input, padding_mask, weight, save_mean, save_invstd, channels_last);
  // In training the saved statistics are those of input; in eval they are
  // the running statistics, constants of a formula linear in grad_output.
  return differentiable_norm_backward(
      op, batch_norm_axes(input, padding_mask.value_or(Tensor()), channels_last), grad_output, input, weight,
      save_mean, save_invstd, /*stats_from_input=*/training, /*centered=*/true, output_mask);
}

std::tuple<Tensor, Tensor, Tensor> layer_norm_backward_autograd(
    const Tensor& grad_output, const Tensor& input, at::IntArrayRef normalized_shape,
    const std::optional<Tensor>& padding_mask, const Tensor& mean, const Tensor& rstd,
    const std::optional<Tensor>& weight, std::array<bool, 3> output_mask) {
  if (!records_graph({grad_output, input, mean, rstd, weight.value_or(Tensor())})) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return layer_norm_backward(grad_output, input, normalized_shape, padding_mask, mean, rstd, weight, output_mask);
  }
  constexpr const char* op = "masknorm::layer_norm_backward";
  check_row_norm_backward_args(op, grad_output, input, normalized_shape, padding_mask, weight, mean, rstd);
  return differentiable_norm_backward(
      op, row_norm_axes(input, normalized_shape, padding_mask.value_or(Tensor())), grad_output, input, weight, mean,
      rstd, /*stats_from_input=*/true, /*centered=*/true, output_mask);
}

std::tuple<Tensor, Tensor> rms_norm_backward_autograd(
    const Tensor& grad_output, const Tensor& input, at::IntArrayRef normalized_shape,
    const std::optional<Tensor>& padding_mask, const Tensor& rstd, const std::optional<Tensor>& weight,
    std::array<bool, 2> output_mask) {
  if (!records_graph({grad_output, input, rstd, weight.value_or(Tensor())})) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return rms_norm_backward(grad_output, input, normalized_shape, padding_mask, rstd, weight, output_mask);
  }
  constexpr const char* op = "masknorm::rms_norm_backward";
  check_row_norm_backward_args(op, grad_output, input, normalized_shape, padding_mask, weight, std::nullopt, rstd);
  auto [dx, dw, db] = differentiable_norm_backward(
      op, row_norm_axes(input, normalized_shape, padding_mask.value_or(Tensor())), grad_output, input, weight,
      /*save_mean=*/Tensor(), rstd, /*stats_from_input=*/true, /*centered=*/false,
      {output_mask[0], output_mask[1], false});
  return {dx, dw};
}

std::tuple<Tensor, Tensor, Tensor> group_norm_backward_autograd(
    const Tensor& grad_output, const Tensor& input, const std::optional<Tensor>& padding_mask,
    const std::optional<Tensor>& weight, const Tensor& mean, const Tensor& rstd, int64_t num_groups,
    bool channels_last, std::array<bool, 3> output_mask) {
  if (!records_graph({grad_output, input, mean, rstd, weight.value_or(Tensor())})) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return group_norm_backward(
        grad_output, input, padding_mask, weight, mean, rstd, num_groups, channels_last, output_mask);
  }
  constexpr const char* op = "masknorm::group_norm_backward";
  check_group_norm_backward_args(
      op, grad_output, input, padding_mask, weight, mean, rstd, num_groups, channels_last);
  // The composite on the input viewed with its groups as a dimension.
  const BatchNormLayout layout = batch_norm_layout(input, channels_last);
  const auto view = group_norm_view(layout, num_groups);
  auto [dx, dw, db] = differentiable_norm_backward(
      op, group_norm_axes(layout, num_groups, padding_mask.value_or(Tensor())), grad_output.reshape(view),
      input.reshape(view), weight, mean, rstd, /*stats_from_input=*/true, /*centered=*/true, output_mask);
  const auto flat = [](const Tensor& t) { return t.defined() ? t.reshape({-1}) : t; };
  return {dx.defined() ? dx.reshape(input.sizes()) : dx, flat(dw), flat(db)};
}

}  // namespace

TORCH_LIBRARY_IMPL(masknorm, Autograd, m) {
  m.impl("batch_norm", &batch_norm_autograd);
  m.impl("batch_norm_backward", &batch_norm_backward_autograd);
  m.impl("layer_norm", &layer_norm_autograd);
  m.impl("layer_norm_backward", &layer_norm_backward_autograd);
  m.impl("rms_norm", &rms_norm_autograd);
  m.impl("rms_norm_backward", &rms_norm_backward_autograd);
  m.impl("group_norm", &group_norm_autograd);
  m.impl("group_norm_backward", &group_norm_backward_autograd);
  m.impl("instance_norm", &instance_norm_autograd);
  for (const char* stage : {"batch_norm_stats", "batch_norm_merge_stats", "batch_norm_elemt",
                            "batch_norm_backward_reduce", "batch_norm_backward_elemt"}) {
    m.impl(stage, torch::autograd::autogradNotImplementedFallback());
  }
}

TORCH_LIBRARY_IMPL(masknorm, ADInplaceOrView, m) {
  m.impl("batch_norm", torch::autograd::autogradNotImplementedInplaceOrViewFallback());
  m.impl("batch_norm_merge_stats", torch::autograd::autogradNotImplementedInplaceOrViewFallback());
  m.impl("instance_norm", torch::autograd::autogradNotImplementedInplaceOrViewFallback());
}

}  // namespace masknorm
