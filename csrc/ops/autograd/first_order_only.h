// Autograd for the backward ops: differentiable once, with a clear error when
// a second derivative is asked for (create_graph=True then backward again).
// Without it the dispatcher's fallback would let double backward through and
// return wrong second derivatives.
#pragma once

#include <torch/autograd.h>

#include <functional>
#include <string>
#include <vector>

namespace masknorm {

class FirstOrderOnly : public torch::autograd::Function<FirstOrderOnly> {
 public:
  // `call` runs the backward op below autograd; `inputs` are its tensor
  // arguments, passed only so the graph records where gradients would flow.
  template <typename... Inputs>
  static torch::autograd::variable_list forward(
      torch::autograd::AutogradContext* ctx, const std::string& op,
      const std::function<torch::autograd::variable_list()>& call, const Inputs&... inputs) {
    ctx->saved_data["op"] = op;
    at::AutoDispatchBelowADInplaceOrView guard;
    return call();
  }

  static torch::autograd::variable_list backward(
      torch::autograd::AutogradContext* ctx, torch::autograd::variable_list) {
    TORCH_CHECK(
        false, ctx->saved_data["op"].toStringRef(),
        ": double backward (differentiating a gradient of a masknorm op) is not supported yet");
  }
};

// Runs a backward op through FirstOrderOnly. Outputs the op leaves undefined
// (not in its output_mask) bypass the autograd Function, which only wraps
// defined tensors, and come back undefined in their place.
template <typename... Inputs>
torch::autograd::variable_list apply_first_order_only(
    const std::string& op, const std::function<torch::autograd::variable_list()>& call,
    const Inputs&... inputs) {
  std::vector<bool> defined;
  const std::function<torch::autograd::variable_list()> call_defined = [&]() {
    torch::autograd::variable_list kept;
    for (const auto& t : call()) {
      defined.push_back(t.defined());
      if (t.defined()) kept.push_back(t);
    }
    return kept;
  };
  const auto kept = FirstOrderOnly::apply(op, call_defined, inputs...);
  torch::autograd::variable_list result;
  size_t next = 0;
  for (const bool d : defined) result.push_back(d ? kept[next++] : at::Tensor());
  return result;
}

}  // namespace masknorm
