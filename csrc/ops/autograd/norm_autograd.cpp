// Autograd of the masknorm ops, registered for the Autograd key so Python and
// C++ callers get gradients alike.
//  - batch_norm, layer_norm, rms_norm, group_norm, instance_norm: each
//    records one graph node (NormBackward, written like the nodes torch
//    generates for its own ops) whose backward calls the op's backward op;
//    each norm supplies the node's name, the attributes it keeps and its
//    backward call.
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

#include <ATen/FuncTorchTLS.h>
#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/csrc/dynamo/compiled_autograd.h>
#include <torch/library.h>

#include <array>
#include <string>
#include <utility>
#include <vector>

namespace masknorm {
namespace {

using at::Tensor;
using torch::autograd::SavedVariable;
using torch::autograd::variable_list;
using torch::dynamo::autograd::CompiledNodeArgs;
using torch::dynamo::autograd::SwapSavedVariables;

// What every norm's backward reads, in one order; undefined where a norm has
// none (no mask, no weight, RMS norm's mean).
struct SavedTensors {
  Tensor input, padding_mask, weight, mean, rstd;
};

std::optional<Tensor> maybe(const Tensor& t) { return t.defined() ? std::optional<Tensor>(t) : std::nullopt; }

// The graph node of a norm. Its next edges are the norm's differentiable
// arguments (input, weight[, bias]); backward computes the gradients this
// pass asks for (task_should_compute_output) with the norm's backward op.
// A hand-written node, like torch's generated ones: a custom
// torch::autograd::Function would keep a context of named values and
// demangle its type name on every backward, costs that show in the
// per-call time of small tensors. `Norm` supplies
//   kName: the node's name (grad_fn, profiler, errors);
//   Attributes: the non-tensor arguments backward needs, and
//     collect(args, attributes) for compiled autograd's cache key;
//   backward(grad_output, saved, attributes, output_mask): the gradients, one
//     per next edge.
template <typename Norm>
struct NormBackward final : public torch::autograd::Node {
  using Attributes = typename Norm::Attributes;

  std::string name() const override { return Norm::kName; }

  variable_list apply(variable_list&& grads) override {
    std::lock_guard<std::mutex> lock(mutex_);
    std::array<bool, 3> output_mask{};
    bool any = false;
    for (size_t i = 0; i < num_outputs(); ++i) any |= output_mask[i] = task_should_compute_output(i);
    // The statistics outputs are not differentiable: the output's gradient
    // is the only one, undefined when it is zero.
    if (!any || !grads[0].defined()) return variable_list(num_outputs());
    const SavedTensors saved{input_.unpack(), padding_mask_.unpack(), weight_.unpack(), mean_.unpack(),
                             rstd_.unpack()};
    return Norm::backward(grads[0], saved, attributes_, output_mask);
  }

  void release_variables() override {
    std::lock_guard<std::mutex> lock(mutex_);
    for (SavedVariable* v : saved_variables()) v->reset_data();
  }

  // Compiled autograd: the saved tensors become graph inputs, the
  // attributes part of the cache key; apply runs on its traced tensors.
  void compiled_args(CompiledNodeArgs& args) const override {
    for (const SavedVariable* v : saved_variables()) args.collect(*v, false);
    Norm::collect(args, attributes_);
  }
  variable_list apply_with_saved(const variable_list& grads, SwapSavedVariables& swap) override {
    for (SavedVariable* v : saved_variables()) swap.before(*v);
    variable_list result = apply(variable_list(grads));
    for (SavedVariable* v : saved_variables()) swap.after(*v);
    return result;
  }

  // Saves what backward reads and makes this node the output's grad_fn.
  void record(
      const Tensor& output, const Tensor& input, const std::optional<Tensor>& padding_mask,
      const std::optional<Tensor>& weight, const Tensor& mean, const Tensor& rstd, Attributes attributes) {
    input_ = SavedVariable(input, false);
    padding_mask_ = SavedVariable(padding_mask, false);
    weight_ = SavedVariable(weight, false);
    mean_ = SavedVariable(mean, false);
    rstd_ = SavedVariable(rstd, false);
    attributes_ = std::move(attributes);
    torch::autograd::set_history(output, c10::intrusive_ptr<Node>::reclaim_copy(this));
  }

 private:
  std::array<SavedVariable*, 5> saved_variables() { return {&input_, &padding_mask_, &weight_, &mean_, &rstd_}; }
  std::array<const SavedVariable*, 5> saved_variables() const {
    return {&input_, &padding_mask_, &weight_, &mean_, &rstd_};
  }

  SavedVariable input_, padding_mask_, weight_, mean_, rstd_;
  Attributes attributes_;
};

// Dual tensors (forward-mode AD) get an error: the ops have no forward
// derivative, and would drop the tangent silently.
void check_no_tangent(const char* op, const char* name, const std::optional<Tensor>& t) {
  TORCH_CHECK_NOT_IMPLEMENTED(!torch::autograd::isFwGradDefined(t), op,
                              ": forward-mode AD is not supported: expected ", name,
                              " without a tangent, but got a dual tensor");
}

// What every forward op does before its kernel runs, with its differentiable
// arguments (input, weight[, bias], the order backward returns their
// gradients in): checks that input is given (autograd reads it) and that no
// argument is a dual tensor, and returns the norm's node with its next edges,
// or null when no graph is recorded (no_grad, inference, nothing requiring
// grad). Under torch.func's transforms the node would see the transforms'
// wrapped tensors and give wrong gradients: refused, as torch refuses C++
// autograd Functions there.
template <typename Norm, typename... Parameters>
c10::intrusive_ptr<NormBackward<Norm>> graph_node(
    const char* op, const Tensor& input, const std::optional<Tensor>& weight, const Parameters&... bias) {
  check_given(op, {{"input", input}});
  check_no_tangent(op, "input", input);
  check_no_tangent(op, "weight", weight);
  (check_no_tangent(op, "bias", bias), ...);
  if (!records_graph({input, weight.value_or(Tensor()), bias.value_or(Tensor())...})) return {};
  if (const auto& functorch = at::functorch::functorchTLSAccessor()) {
    bool in_transform = false;
    try {
      functorch->checkSupportsCppAutogradFunction();  // raises inside a transform
    } catch (const c10::Error&) {
      in_transform = true;
    }
    TORCH_CHECK_NOT_IMPLEMENTED(!in_transform, op,
                                ": torch.func transforms of a call that records a graph (grad, vjp, jacrev, or "
                                "vmap of inputs requiring grad) are not supported; use torch.autograd.grad");
  }
  auto node = c10::make_intrusive<NormBackward<Norm>>();
  node->set_next_edges(torch::autograd::collect_next_edges(input, weight, bias...));
  return node;
}

// The op's own kernel, below autograd; ADInplaceOrView still runs (version
// counters of mutated running statistics).
template <typename Call>
auto below_autograd(Call&& call) {
  at::AutoDispatchBelowAutograd guard;
  return call();
}

// ------------------------------------------------------------------ batch norm

struct BatchNorm {
  static constexpr const char* kName = "MaskedBatchNormBackward";
  struct Attributes {
    bool training = false, channels_last = false;
  };
  static void collect(CompiledNodeArgs& args, const Attributes& a) {
    args.collect(a.training);
    args.collect(a.channels_last);
  }
  static variable_list backward(
      const Tensor& grad_output, const SavedTensors& s, const Attributes& a, std::array<bool, 3> output_mask) {
    auto [dx, dw, db] = batch_norm_backward(
        grad_output, s.input, maybe(s.padding_mask), maybe(s.weight), s.mean, s.rstd, a.training, a.channels_last,
        output_mask);
    return {dx, dw, db};
  }
};

// ------------------------------------------------------------ layer / RMS norm

struct LayerNorm {
  static constexpr const char* kName = "MaskedLayerNormBackward";
  struct Attributes {
    std::vector<int64_t> normalized_shape;
  };
  static void collect(CompiledNodeArgs& args, const Attributes& a) { args.collect(a.normalized_shape); }
  static variable_list backward(
      const Tensor& grad_output, const SavedTensors& s, const Attributes& a, std::array<bool, 3> output_mask) {
    auto [dx, dw, db] = layer_norm_backward(
        grad_output, s.input, a.normalized_shape, maybe(s.padding_mask), s.mean, s.rstd, maybe(s.weight),
        output_mask);
    return {dx, dw, db};
  }
};

struct RMSNorm {
  static constexpr const char* kName = "MaskedRMSNormBackward";
  using Attributes = LayerNorm::Attributes;
  static void collect(CompiledNodeArgs& args, const Attributes& a) { LayerNorm::collect(args, a); }
  static variable_list backward(
      const Tensor& grad_output, const SavedTensors& s, const Attributes& a, std::array<bool, 3> output_mask) {
    auto [dx, dw] = rms_norm_backward(
        grad_output, s.input, a.normalized_shape, maybe(s.padding_mask), s.rstd, maybe(s.weight),
        {output_mask[0], output_mask[1]});
    return {dx, dw};
  }
};

// ------------------------------------------------------ group / instance norm

// Group and instance norm share group_norm_backward (instance norm: one
// group per channel).
struct GroupNorm {
  static constexpr const char* kName = "MaskedGroupNormBackward";
  struct Attributes {
    int64_t num_groups = 1;
    bool channels_last = false;
  };
  static void collect(CompiledNodeArgs& args, const Attributes& a) {
    args.collect(a.num_groups);
    args.collect(a.channels_last);
  }
  static variable_list backward(
      const Tensor& grad_output, const SavedTensors& s, const Attributes& a, std::array<bool, 3> output_mask) {
    auto [dx, dw, db] = group_norm_backward(
        grad_output, s.input, maybe(s.padding_mask), maybe(s.weight), s.mean, s.rstd, a.num_groups,
        a.channels_last, output_mask);
    return {dx, dw, db};
  }
};

struct InstanceNorm : GroupNorm {
  static constexpr const char* kName = "MaskedInstanceNormBackward";
};

// ------------------------------------------------- the Autograd-key kernels

std::tuple<Tensor, Tensor, Tensor> batch_norm_autograd(
    const Tensor& input, const std::optional<Tensor>& padding_mask, const std::optional<Tensor>& weight,
    const std::optional<Tensor>& bias, const std::optional<Tensor>& running_mean,
    const std::optional<Tensor>& running_var, const std::optional<Tensor>& num_batches_tracked, bool training,
    std::optional<double> momentum, double eps, bool channels_last) {
  auto node = graph_node<BatchNorm>("masknorm::batch_norm", input, weight, bias);
  auto result = below_autograd([&] {
    return batch_norm(
        input, padding_mask, weight, bias, running_mean, running_var, num_batches_tracked, training, momentum, eps,
        channels_last);
  });
  if (node) {
    const auto& [output, save_mean, save_invstd] = result;
    node->record(output, input, padding_mask, weight, save_mean, save_invstd, {training, channels_last});
  }
  return result;
}

std::tuple<Tensor, Tensor, Tensor> layer_norm_autograd(
    const Tensor& input, at::IntArrayRef normalized_shape, const std::optional<Tensor>& padding_mask,
    const std::optional<Tensor>& weight, const std::optional<Tensor>& bias, double eps) {
  auto node = graph_node<LayerNorm>("masknorm::layer_norm", input, weight, bias);
  auto result = below_autograd([&] { return layer_norm(input, normalized_shape, padding_mask, weight, bias, eps); });
  if (node) {
    const auto& [output, mean, rstd] = result;
    node->record(output, input, padding_mask, weight, mean, rstd, {normalized_shape.vec()});
  }
  return result;
}

std::tuple<Tensor, Tensor> rms_norm_autograd(
    const Tensor& input, at::IntArrayRef normalized_shape, const std::optional<Tensor>& padding_mask,
    const std::optional<Tensor>& weight, std::optional<double> eps) {
  auto node = graph_node<RMSNorm>("masknorm::rms_norm", input, weight);
  auto result = below_autograd([&] { return rms_norm(input, normalized_shape, padding_mask, weight, eps); });
  if (node) {
    const auto& [output, rstd] = result;
    node->record(output, input, padding_mask, weight, /*mean=*/Tensor(), rstd, {normalized_shape.vec()});
  }
  return result;
}

std::tuple<Tensor, Tensor, Tensor> group_norm_autograd(
    const Tensor& input, const std::optional<Tensor>& padding_mask, const std::optional<Tensor>& weight,
    const std::optional<Tensor>& bias, int64_t num_groups, double eps, bool channels_last) {
  auto node = graph_node<GroupNorm>("masknorm::group_norm", input, weight, bias);
  auto result = below_autograd(
      [&] { return group_norm(input, padding_mask, weight, bias, num_groups, eps, channels_last); });
  if (node) {
    const auto& [output, mean, rstd] = result;
    node->record(output, input, padding_mask, weight, mean, rstd, {num_groups, channels_last});
  }
  return result;
}

std::tuple<Tensor, Tensor, Tensor> instance_norm_autograd(
    const Tensor& input, const std::optional<Tensor>& padding_mask, const std::optional<Tensor>& weight,
    const std::optional<Tensor>& bias, const std::optional<Tensor>& running_mean,
    const std::optional<Tensor>& running_var, double momentum, double eps, bool channels_last) {
  auto node = graph_node<InstanceNorm>("masknorm::instance_norm", input, weight, bias);
  auto result = below_autograd([&] {
    return instance_norm(input, padding_mask, weight, bias, running_mean, running_var, momentum, eps, channels_last);
  });
  if (node) {
    const auto& [output, mean, rstd] = result;
    // One group per channel. (sym_size: the other sizes may be symbolic
    // while tracing, and sizes() would fix them.)
    const int64_t channels = mean.sym_size(1).guard_int(__FILE__, __LINE__);
    node->record(output, input, padding_mask, weight, mean, rstd, {channels, channels_last});
  }
  return result;
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
