// Which kernels serve a device, and the switches that change it. The ops
// call kernels_for() (declared in kernels.h); backends built as separate
// code register here: the CUDA kernels (cuda/kernel_table.cu) at load time.
// The CPU build is chosen in cpu/isa_select.cpp.
#pragma once

#include "kernels.h"

#include <string>

namespace masknorm {

// Called once by the CUDA backend when its library loads.
struct CudaBackend {
  const KernelTable* kernels;
  bool (*stream_is_capturing)();  // true while the current stream captures a CUDA graph
  // Tuning: the row-norm kernels' vectors per thread and block size.
  void (*tune_row_norm)(bool backward, int iters, int block_threads);
};
void register_cuda_backend(const CudaBackend& backend);
bool cuda_kernels_built();
const CudaBackend* cuda_backend();

// Test switch: serve every device, CPU included, from the generic kernels.
void force_generic_kernels(bool on);
bool generic_kernels_forced();

// The fused CUDA kernels (on by default where built); off: CUDA tensors get
// the generic kernels. MASKNORM_CUDA_KERNELS=generic turns them off at start.
void use_fused_cuda_kernels(bool on);
bool fused_cuda_kernels_enabled();

// The name of the table serving `device` ("avx512", "cuda", "generic", ...).
std::string kernels_name(const at::Device& device);

// Whether data-dependent checks (a single valid value per channel in
// training) run for tensors on `device`. They read a result back to the host,
// which on an accelerator waits for the device on every call: always on for
// CPU tensors; on other devices off unless turned on (here or with
// MASKNORM_DEVICE_DATA_CHECKS=1), and never while a CUDA stream captures a graph.
bool data_checks_enabled(const at::Device& device);
void enable_device_data_checks(bool on);

}  // namespace masknorm
