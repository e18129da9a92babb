// The Python extension module masknorm._C: the ops (everything under ops/,
// registered when the module loads; see ops/library.cpp) plus this module,
// which only reports build information. The CPU kernels are chosen per
// instruction set at run time: ops/cpu/dispatch.cpp.
#include "ops/cpu/dispatch.h"

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
    info["cuda"] = false;
    // Which build of the CPU kernels runs here, and why a faster one did not.
    info["cpu_kernels"] = masknorm::cpu::kernels().isa;
    info["cpu_kernels_note"] = masknorm::cpu::kernels_note();
    return info;
  }, "How this extension was built.");
}
