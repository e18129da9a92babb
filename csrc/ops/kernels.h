// The device kernels behind masknorm's ops: one list, one argument struct per
// kernel, one table type. Neighbours: the ops (ops/batch_norm.cpp,
// ops/row_norm.cpp) validate arguments, prepare contiguous tensors and
// preallocated outputs, fill a `*Args` struct and call
// `kernels_for(device).<kernel>(args)` (ops/kernel_registry.cpp). The kernels
// are loops only, one implementation per backend:
//   cpu/      C++ loops, built once per x86-64 instruction set (cpu/kernel_table.cpp)
//   cuda/     CUDA kernels, built when torch has CUDA (cuda/kernel_table.cu)
//   generic/  ATen ops: any device torch supports, and the reference for the others
//
// Every tensor in an Args struct is contiguous and on the input's device. The
// CPU and CUDA loops take its pointers with arg_pointers.h.
// "opmath" is the accumulation dtype: float32 for float16/bfloat16/float32
// input, float64 for float64. Optional tensors are undefined when absent.
// Adding an argument to a kernel: add a field to its struct, fill it in the
// op, read it in each backend.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

namespace masknorm {

// A batch-norm input as kernels see it, built from the input's shape and the
// ops' channels_last (tensor_utils.h: batch_norm_layout):
//  channels_last: C is the contiguous dim, rows of C channels, one mask entry
//    per row: (N, C) input (L = 1) and (N, L, C) input (layouts NC, NLC).
//  otherwise: (N, C, L) planes, the (N, L) mask selects positions inside
//    each row of L (layout NCL).
// In memory both are (outer, C, inner). N stays apart from L for the loops
// that run per sample (group norm).
struct BatchNormLayout {
  int64_t N = 0, C = 0, L = 1;
  bool channels_last = true;
  int64_t positions() const { return N * L; }  // each with C channels
  int64_t outer() const { return channels_last ? N * L : N; }
  int64_t inner() const { return channels_last ? 1 : L; }
};

// The layout the CPU and CUDA loops run: NCL input with L = 1 is (N, C) in
// memory and its (N, 1) mask an (N,) one, so it runs as channels_last
// (vectors along C, work split along N).
inline BatchNormLayout loop_layout(const BatchNormLayout& layout) {
  if (layout.channels_last || layout.L != 1) return layout;
  return BatchNormLayout{layout.N, layout.C, 1, true};
}

// Layer norm (centered) and RMS norm (mean fixed at 0, no bias) of `rows`
// rows of `width` values: output = (x - mean) * rstd * weight + bias on valid
// rows; output, mean and rstd are 0 on padded rows, which are never read.
struct RowNormForwardArgs {
  at::Tensor input;          // (rows, width)
  at::Tensor padding_mask;   // (rows,) bool, or undefined
  at::Tensor weight, bias;   // (width,) opmath, or undefined
  double eps = 0;
  bool centered = true;
  int64_t rows = 0, width = 0;
  at::Tensor output;         // like input
  at::Tensor mean;           // (rows,) opmath; undefined when !centered
  at::Tensor rstd;           // (rows,) opmath
};

// With g = dy * weight and xhat = (x - mean) * rstd, on valid rows:
//   grad_input = rstd * (g - mean(g) - xhat * mean(g * xhat))   (RMS: no mean(g) term)
//   grad_weight = sum over valid rows of dy * xhat, grad_bias = sum of dy.
// grad_input is 0 on padded rows. Outputs not wanted are undefined.
struct RowNormBackwardArgs {
  at::Tensor grad_output, input;  // (rows, width), input's dtype
  at::Tensor padding_mask;        // (rows,) bool, or undefined
  at::Tensor mean;                // (rows,) opmath; undefined when !centered
  at::Tensor rstd;                // (rows,) opmath
  at::Tensor weight;              // (width,) opmath, or undefined
  bool centered = true;
  int64_t rows = 0, width = 0;
  at::Tensor grad_input;          // like input, or undefined
  at::Tensor grad_weight;         // (width,) opmath, or undefined
  at::Tensor grad_bias;           // (width,) opmath, or undefined
};

// Per-channel statistics of the valid positions: count, mean and M2 (sum of
// squared deviations from the mean). Channels without valid positions get 0.
struct BatchNormStatsArgs {
  at::Tensor input;         // the layout's shape
  at::Tensor padding_mask;  // (N,) or (N, L) bool, or undefined
  BatchNormLayout layout;
  at::Tensor mean, m2;      // (C,) opmath
  at::Tensor count;         // () int64
};

// Merges P parts' statistics (Chan et al.; parts with count 0 are skipped,
// whatever their mean and M2 hold) and finishes them: mean, invstd =
// 1/sqrt(M2/count + eps) (0 where count is 0) and the total count. When
// running statistics are given and the total count is at least 2 they move
// towards the batch's (unbiased variance, M2 / (count - 1)) by momentum, or
// by 1/num_batches_tracked when momentum is None (has_momentum false);
// num_batches_tracked, when given, is incremented first in any case.
struct BatchNormMergeStatsArgs {
  at::Tensor part_mean, part_m2;  // (P, C) opmath
  at::Tensor part_count;          // (P,) int64 (the op converts a float count)
  at::Tensor running_mean, running_var;  // (C,) opmath (the op converts and writes back), updated in place, or undefined
  at::Tensor num_batches_tracked;        // () integer, updated in place, or undefined
  bool has_momentum = true;
  double momentum = 0.1, eps = 1e-5;
  int64_t parts = 0, C = 0;
  at::Tensor mean, invstd;  // (C,) opmath
  at::Tensor count;         // () int64
};

// output = (x - mean) * (invstd * weight) + bias at valid positions, 0 at
// padding. mean/invstd are the batch's or the running statistics. With
// running_var given (eval), mean and invstd are outputs, set first to
// running_mean and 1 / sqrt(running_var + eps) (set_from_running_stats).
struct BatchNormElemtArgs {
  at::Tensor input;
  at::Tensor padding_mask;
  BatchNormLayout layout;
  at::Tensor mean, invstd;    // (C,) opmath
  at::Tensor weight, bias;    // (C,) opmath, or undefined
  at::Tensor running_mean, running_var;  // (C,) opmath, or undefined
  double eps = 0;
  at::Tensor output;          // like input
};

// BatchNormElemtArgs' eval step in tensor ops (the generic and CUDA
// backends); the CPU loop computes the same per channel, in opmath:
// 1 / sqrt(running_var + opmath(eps)).
inline void set_from_running_stats(const BatchNormElemtArgs& a) {
  if (!a.running_var.defined()) return;
  a.mean.copy_(a.running_mean);
  at::Tensor invstd = a.invstd;  // a handle: the output's storage
  at::add_out(invstd, a.running_var, a.eps).rsqrt_();
}

// Per channel over valid positions: sum_dy = sum(dy) and
// sum_dy_xhat = sum(dy * (x - mean) * invstd). They are the bias and weight
// gradients, and (summed over processes) what the input gradient needs.
struct BatchNormBackwardReduceArgs {
  at::Tensor grad_output, input;
  at::Tensor padding_mask;
  BatchNormLayout layout;
  at::Tensor mean, invstd;         // (C,) opmath
  at::Tensor sum_dy, sum_dy_xhat;  // (C,) opmath
};

// grad_input at valid positions, 0 at padding:
//   with batch statistics (sums and count given), n = max(count, 1):
//     dx = weight * invstd * (dy - sum_dy / n - xhat * sum_dy_xhat / n)
//   with given statistics (sums undefined): dx = weight * invstd * dy
struct BatchNormBackwardElemtArgs {
  at::Tensor grad_output, input;
  at::Tensor padding_mask;
  BatchNormLayout layout;
  at::Tensor mean, invstd;         // (C,) opmath
  at::Tensor weight;               // (C,) opmath, or undefined
  at::Tensor sum_dy, sum_dy_xhat;  // (C,) opmath, or undefined (given statistics)
  at::Tensor count;                // () int64, defined with the sums
  at::Tensor grad_input;           // like input
};

// Group norm of each sample's valid positions (instance norm: one group per
// channel), on a batch-norm layout whose N is the number of samples:
// statistics per (sample, group) over the group's C / groups channels at the
// sample's valid positions. output = (x - mean) * rstd * weight + bias at
// valid positions, 0 at padding; mean and rstd are 0 for a sample without
// valid positions. With running statistics (instance norm in training) each
// group's running mean and variance move by momentum towards the average,
// over the samples with at least 2 valid values in the group, of their mean
// and unbiased variance; unchanged when no sample has 2.
struct GroupNormForwardArgs {
  at::Tensor input;
  at::Tensor padding_mask;               // (N,) or (N, L) bool, or undefined
  BatchNormLayout layout;
  int64_t groups = 1;                    // divides layout.C
  at::Tensor weight, bias;               // (C,) opmath, or undefined
  double eps = 0;
  at::Tensor running_mean, running_var;  // (groups,) opmath, updated in place, or undefined
  double momentum = 0.1;
  at::Tensor output;                     // like input
  at::Tensor mean, rstd;                 // (N, groups) opmath
};

// With g = dy * weight, xhat = (x - mean) * rstd and k the group's valid
// count, at valid positions:
//   grad_input = rstd * (g - sum(g) / k - xhat * sum(g * xhat) / k)
//   grad_weight = sum over samples and valid positions of dy * xhat, grad_bias = sum of dy.
// grad_input is 0 at padding. Outputs not wanted are undefined.
struct GroupNormBackwardArgs {
  at::Tensor grad_output, input;  // the layout's shape, input's dtype
  at::Tensor padding_mask;        // (N,) or (N, L) bool, or undefined
  BatchNormLayout layout;
  int64_t groups = 1;
  at::Tensor mean, rstd;          // (N, groups) opmath
  at::Tensor weight;              // (C,) opmath, or undefined
  at::Tensor grad_input;          // like input, or undefined
  at::Tensor grad_weight;         // (C,) opmath, or undefined
  at::Tensor grad_bias;           // (C,) opmath, or undefined
};

// The one list: (kernel, argument struct). Everything per kernel below (the
// table, each backend's declarations, the tables' contents) comes from it.
#define MASKNORM_FOR_EACH_KERNEL(X)                          \
  X(row_norm_forward, RowNormForwardArgs)                   \
  X(row_norm_backward, RowNormBackwardArgs)                 \
  X(batch_norm_stats, BatchNormStatsArgs)                   \
  X(batch_norm_merge_stats, BatchNormMergeStatsArgs)        \
  X(batch_norm_elemt, BatchNormElemtArgs)                   \
  X(batch_norm_backward_reduce, BatchNormBackwardReduceArgs) \
  X(batch_norm_backward_elemt, BatchNormBackwardElemtArgs) \
  X(group_norm_forward, GroupNormForwardArgs)               \
  X(group_norm_backward, GroupNormBackwardArgs)

// Declares a backend's kernels: `namespace masknorm::cpu { MASKNORM_DECLARE_KERNELS }`.
#define MASKNORM_DECLARE_KERNEL_(name, Args) void name(const Args& args);
#define MASKNORM_DECLARE_KERNELS MASKNORM_FOR_EACH_KERNEL(MASKNORM_DECLARE_KERNEL_)

// One backend's kernels. A table built from other sources than the ones
// loading it (a stale instruction-set library) is refused: `version` is
// kVersion, bumped when the kernel list changes, and `abi` is kAbi, the sum of
// the argument structs' sizes; the loader compares both.
struct KernelTable {
  static constexpr int kVersion = 3;
  int version;
  int64_t abi;
  const char* name;  // "default", "avx2", "avx512", "cuda", "generic"
#define MASKNORM_TABLE_MEMBER_(name, Args) void (*name)(const Args&);
  MASKNORM_FOR_EACH_KERNEL(MASKNORM_TABLE_MEMBER_)
#undef MASKNORM_TABLE_MEMBER_

  static constexpr int64_t kAbi = 0
#define MASKNORM_TABLE_SIZE_(name, Args) + int64_t(sizeof(Args))
      MASKNORM_FOR_EACH_KERNEL(MASKNORM_TABLE_SIZE_)
#undef MASKNORM_TABLE_SIZE_
      ;
};

// The table of backend `ns` (a namespace declaring MASKNORM_DECLARE_KERNELS):
//   static const KernelTable table = MASKNORM_KERNEL_TABLE(masknorm::cpu, "avx2");
#define MASKNORM_TABLE_ENTRY_(name, Args) , &ns_::name
#define MASKNORM_KERNEL_TABLE(ns, table_name)                                                    \
  [] {                                                                                          \
    namespace ns_ = ns;                                                                         \
    return ::masknorm::KernelTable{                                                             \
        ::masknorm::KernelTable::kVersion, ::masknorm::KernelTable::kAbi,                       \
        table_name MASKNORM_FOR_EACH_KERNEL(MASKNORM_TABLE_ENTRY_)};                             \
  }()

// The kernels for tensors on `device` (ops/kernel_registry.cpp): CPU tensors
// get the CPU build chosen for this processor, CUDA tensors the CUDA kernels
// when built and enabled, anything else (or everything, when forced for
// testing) the generic kernels.
const KernelTable& kernels_for(const at::Device& device);

namespace generic {
MASKNORM_DECLARE_KERNELS
}  // namespace generic

}  // namespace masknorm
