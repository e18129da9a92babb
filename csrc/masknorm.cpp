// The Python extension module masknorm._C: the ops (everything under ops/,
// registered when the module loads; ops/library.h says where each part of an
// op lives) plus this module: build information and the kernel switches of
// ops/kernel_registry.h.
#include "ops/cpu/isa_select.h"
#include "ops/kernel_registry.h"

#include <torch/extension.h>

#ifndef MASKNORM_TORCH_VERSION
#define MASKNORM_TORCH_VERSION "unknown"
#endif

#ifndef MASKNORM_VERSION
#define MASKNORM_VERSION "0.0.0"
#endif

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  module.doc() = "masknorm: padding-aware BatchNorm, LayerNorm and RMSNorm ops (torch.ops.masknorm)";
  module.attr("__version__") = MASKNORM_VERSION;
  module.def("build_info", [] {
    pybind11::dict info;
    info["version"] = MASKNORM_VERSION;
    info["torch_version"] = MASKNORM_TORCH_VERSION;
    info["cuda"] = masknorm::cuda_kernels_built();
    // Which build of the CPU kernels runs here, and why a faster one did not.
    info["cpu_kernels"] = masknorm::cpu::kernels().name;
    info["cpu_kernels_note"] = masknorm::cpu::kernels_note();
    return info;
  }, "How this extension was built.");
  module.def(
      "_force_generic_kernels", &masknorm::force_generic_kernels,
      "Test switch: serve every device, CPU included, from the ATen-op kernels.");
  module.def("_generic_kernels_forced", &masknorm::generic_kernels_forced);
  module.def(
      "_use_fused_cuda_kernels", &masknorm::use_fused_cuda_kernels,
      "Serve CUDA tensors from the fused CUDA kernels (True) or the ATen-op kernels (False).");
  module.def("_fused_cuda_kernels_enabled", &masknorm::fused_cuda_kernels_enabled);
  module.def(
      "_enable_device_data_checks", &masknorm::enable_device_data_checks,
      "Run data-dependent checks (a single valid value in training) on accelerators too: a host sync per call.");
  module.def(
      "_cuda_row_norm_tuning",
      [](bool backward, int iters, int block_threads) {
        const masknorm::CudaBackend* cuda = masknorm::cuda_backend();
        TORCH_CHECK(cuda != nullptr, "masknorm was built without its CUDA kernels");
        cuda->tune_row_norm(backward, iters, block_threads);
      },
      "Tuning: vectors per thread (1, 2, 4) and threads per block of the CUDA row-norm kernels.");
  module.def(
      "_kernels_for", [](const std::string& device) { return masknorm::kernels_name(at::Device(device)); },
      "The name of the kernels serving tensors on `device`.");
}
