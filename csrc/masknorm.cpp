// The Python extension module masknorm._C: the ops (everything under ops/,
// registered when the module loads; ops/library.h says where each part of an
// op lives) plus this module: build information and the kernel switches of
// ops/kernel_registry.h.
#include "ops/cpu/isa_select.h"
#include "ops/kernel_registry.h"

#include <torch/extension.h>

#include <string>

#ifndef MASKNORM_TORCH_VERSION
#define MASKNORM_TORCH_VERSION "unknown"
#endif

// torch.version.cuda of the torch compiled against ("" for a CPU-only torch).
#ifndef MASKNORM_TORCH_CUDA
#define MASKNORM_TORCH_CUDA ""
#endif

#define MASKNORM_STRINGIFY_(x) #x
#define MASKNORM_STRINGIFY(x) MASKNORM_STRINGIFY_(x)
#if defined(_GLIBCXX_USE_CXX11_ABI)
#define MASKNORM_CXX11_ABI MASKNORM_STRINGIFY(_GLIBCXX_USE_CXX11_ABI)
#else
#define MASKNORM_CXX11_ABI ""  // not libstdc++: no such switch
#endif

#ifndef MASKNORM_VERSION
#define MASKNORM_VERSION "0.0.0"
#endif

// The torch this module was compiled against, as bytes of the binary:
// python/masknorm/_build_check.py reads them from the file before loading it,
// so that a module built for another torch is reported as such rather than
// as an undefined symbol (or worse, a crash). Keep the format in step with it.
extern "C" __attribute__((used)) const char masknorm_build_stamp[] =
    "MASKNORM_BUILD_STAMP:torch_version=" MASKNORM_TORCH_VERSION ";torch_cuda=" MASKNORM_TORCH_CUDA
    ";cxx11_abi=" MASKNORM_CXX11_ABI ";";

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  module.doc() = "masknorm: padding-aware BatchNorm, LayerNorm and RMSNorm ops (torch.ops.masknorm)";
  module.attr("__version__") = MASKNORM_VERSION;
  module.def("build_info", [] {
    pybind11::dict info;
    info["version"] = MASKNORM_VERSION;
    info["torch_version"] = MASKNORM_TORCH_VERSION;
    // torch.version.cuda of that torch (None: a CPU-only torch) and its C++ ABI
    // (torch._C._GLIBCXX_USE_CXX11_ABI; None where the compiler has no such switch).
    const std::string cuda = MASKNORM_TORCH_CUDA, abi = MASKNORM_CXX11_ABI;
    info["torch_cuda"] = cuda.empty() ? pybind11::object(pybind11::none()) : pybind11::str(cuda);
    info["cxx11_abi"] = abi.empty() ? pybind11::object(pybind11::none()) : pybind11::bool_(abi == "1");
    info["cuda"] = masknorm::cuda_kernels_built();  // masknorm's CUDA kernels are built in
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
