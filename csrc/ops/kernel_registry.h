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
};
void register_cuda_backend(const CudaBackend& backend);
bool cuda_kernels_built();

// Test switch: serve every device, CPU included, from the generic kernels.
void force_generic_kernels(bool on);
bool generic_kernels_forced();

// The fused CUDA kernels (on by default where built); off: CUDA tensors get
// the generic kernels. MASKNORM_CUDA_KERNELS=generic turns them off at start.
void use_fused_cuda_kernels(bool on);
bool fused_cuda_kernels_enabled();

// The name of the table serving `device` ("avx512", "cuda", "generic", ...).
std::string kernels_name(const at::Device& device);

// True when reading a tensor on `device` back to the host is allowed now:
// always, except on a CUDA stream that is capturing a graph. Data-dependent
// checks (a single valid value in training) are skipped when it is not.
bool host_sync_allowed(const at::Device& device);

}  // namespace masknorm
