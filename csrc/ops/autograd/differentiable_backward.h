// Double backward for the norms. The backward ops (batch_norm_backward,
// layer_norm_backward, rms_norm_backward, group_norm_backward) run their kernels unless an
// autograd graph must be recorded through them (grad mode on and an input
// that requires grad: create_graph=True, gradient penalties, meta-learning).
// Then they compute the same gradients with the composite of at:: ops below,
// and torch's autograd differentiates that composite: second and higher
// derivatives, from Python and C++ alike. The generic row-norm and
// group-norm kernels (generic/) run the same composite as their backward.
//
// The norms share one formula (group norm: the input viewed with its groups
// as a dimension, tensor_utils.h group_norm_axes). With valid positions V (padding
// excluded), statistics taken over `stat_dims`, g = dy * w and
// xhat = (x - mean) * rstd:
//   dx = rstd * (g - mean_V(g) - xhat * mean_V(g * xhat))   statistics of the input
//   dx = rstd * g                                            given statistics (BN eval)
//   dw = sum(dy * xhat), db = sum(dy)                        over `param_dims`, valid only
// RMS norm is the uncentered case (mean 0, no mean_V(g) term).
//
// Padding is selected out with at::where (never multiplied by 0) before any
// arithmetic, so NaN/inf stored at padded positions reaches neither the
// gradients nor their derivatives.
#pragma once

#include "../tensor_utils.h"

#include <array>
#include <optional>

namespace masknorm {

// True when a backward op called now must record an autograd graph: grad mode
// is enabled and one of `tensors` (undefined ones are skipped) requires grad.
bool records_graph(at::ArrayRef<at::Tensor> tensors);

// The gradients (grad_input, grad_weight, grad_bias) of a norm as a
// differentiable composite. `stats_from_input`: the saved statistics are
// those of `input` (BN training, LN, RMS); they are then recomputed from
// input so that derivatives see their dependence on it, and only their values
// are read from save_mean and save_rstd (which carries eps), as the kernels
// read them. Otherwise (BN eval) save_mean and
// save_rstd are constants of the formula, differentiable like any input.
// save_mean is undefined for RMS norm (`centered` false). Entries not in
// output_mask come back undefined.
std::tuple<at::Tensor, at::Tensor, at::Tensor> differentiable_norm_backward(
    const char* op,
    const NormAxes& axes,
    const at::Tensor& grad_output,
    const at::Tensor& input,
    const std::optional<at::Tensor>& weight,
    const at::Tensor& save_mean,
    const at::Tensor& save_rstd,
    bool stats_from_input,
    bool centered,
    std::array<bool, 3> output_mask);

}  // namespace masknorm
