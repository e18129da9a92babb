// Registers the CUDA kernels (row_norm_kernel.cu, batch_norm_kernel.cu) as
// the kernels of CUDA tensors when the library loads (../kernel_registry.h).
// Built only with CUDA (build.json's cuda_kernels, setup.py MASKNORM_CUDA).
#include "../kernel_registry.h"

#include <c10/cuda/CUDAGraphsC10Utils.h>

namespace masknorm::cuda {
MASKNORM_DECLARE_KERNELS
void set_row_norm_tuning(bool backward, int iters, int block_threads);  // row_norm_kernel.cu
}  // namespace masknorm::cuda

namespace masknorm {
namespace {

bool stream_is_capturing() {
  return c10::cuda::currentStreamCaptureStatusMayInitCtx() != c10::cuda::CaptureStatus::None;
}

const bool registered = [] {
  static const KernelTable table = MASKNORM_KERNEL_TABLE(masknorm::cuda, "cuda");
  register_cuda_backend({&table, &stream_is_capturing, &cuda::set_row_norm_tuning});
  return true;
}();

}  // namespace
}  // namespace masknorm
