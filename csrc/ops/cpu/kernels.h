// The CPU kernels of every masknorm op, and the table through which the
// extension reaches them.
//
// The kernels (cpu/*_kernel.cpp) are compiled more than once: portably into
// the extension itself, and, on x86-64, into one library per instruction set
// (AVX2, AVX512) built with that instruction set enabled. The extension picks
// the best library this CPU runs (cpu/dispatch.cpp) and registers its table's
// entries as the ops' CPU kernels.
#pragma once

#include <ATen/ATen.h>

#include <array>
#include <optional>
#include <tuple>

namespace masknorm::cpu {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> batch_norm_forward_cpu(
    const at::Tensor& input, const std::optional<at::Tensor>& padding_mask,
    const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& running_mean, const std::optional<at::Tensor>& running_var,
    bool training, double eps, bool channels_last);

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_backward_cpu(
    const at::Tensor& grad_output, const at::Tensor& input, const std::optional<at::Tensor>& padding_mask,
    const std::optional<at::Tensor>& weight, const at::Tensor& save_mean, const at::Tensor& save_invstd,
    bool training, bool channels_last, std::array<bool, 3> output_mask);

void batch_norm_update_running_stats_cpu(
    at::Tensor& running_mean, at::Tensor& running_var, const at::Tensor& save_mean,
    const at::Tensor& save_invstd, const at::Tensor& count, double eps, std::optional<double> momentum,
    const std::optional<at::Tensor>& num_batches_tracked);

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_forward_cpu(
    const at::Tensor& input, at::IntArrayRef normalized_shape, const std::optional<at::Tensor>& padding_mask,
    const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias, double eps);

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_backward_cpu(
    const at::Tensor& grad_output, const at::Tensor& input, at::IntArrayRef normalized_shape,
    const std::optional<at::Tensor>& padding_mask, const at::Tensor& mean, const at::Tensor& rstd,
    const std::optional<at::Tensor>& weight, std::array<bool, 3> output_mask);

std::tuple<at::Tensor, at::Tensor> rms_norm_forward_cpu(
    const at::Tensor& input, at::IntArrayRef normalized_shape, const std::optional<at::Tensor>& padding_mask,
    const std::optional<at::Tensor>& weight, std::optional<double> eps);

std::tuple<at::Tensor, at::Tensor> rms_norm_backward_cpu(
    const at::Tensor& grad_output, const at::Tensor& input, at::IntArrayRef normalized_shape,
    const std::optional<at::Tensor>& padding_mask, const at::Tensor& rstd,
    const std::optional<at::Tensor>& weight, std::array<bool, 2> output_mask);

// One build of the kernels. Bump kVersion whenever a signature changes: a
// library whose table has another version is not used.
struct KernelTable {
  static constexpr int kVersion = 1;
  int version;
  const char* isa;  // "default", "avx2", "avx512"
  decltype(&batch_norm_forward_cpu) batch_norm;
  decltype(&batch_norm_backward_cpu) batch_norm_backward;
  decltype(&batch_norm_update_running_stats_cpu) batch_norm_update_running_stats;
  decltype(&layer_norm_forward_cpu) layer_norm;
  decltype(&layer_norm_backward_cpu) layer_norm_backward;
  decltype(&rms_norm_forward_cpu) rms_norm;
  decltype(&rms_norm_backward_cpu) rms_norm_backward;
};

}  // namespace masknorm::cpu

// The table of the build this translation unit belongs to (cpu/kernel_table.cpp).
extern "C" const masknorm::cpu::KernelTable* masknorm_cpu_kernel_table();
