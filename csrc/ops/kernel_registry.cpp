// kernels_for(device) and the backend switches (kernel_registry.h): CPU
// tensors get the instruction-set build chosen by cpu/isa_select.cpp, CUDA
// tensors the CUDA backend when one registered itself and is enabled, every
// other device (MPS, XPU, ...) the generic kernels of generic/.
#include "kernel_registry.h"

#include "cpu/isa_select.h"
#include "masknorm/ops.h"

#include <atomic>
#include <cstdlib>
#include <cstring>

namespace masknorm {
namespace {

std::atomic<bool> force_generic{false};
std::atomic<const CudaBackend*> registered_cuda{nullptr};

bool fused_cuda_default() {
  const char* env = std::getenv("MASKNORM_CUDA_KERNELS");
  return env == nullptr || std::strcmp(env, "generic") != 0;
}

std::atomic<bool> fused_cuda{fused_cuda_default()};

bool env_is(const char* name, const char* value) {
  const char* env = std::getenv(name);
  return env != nullptr && std::strcmp(env, value) == 0;
}
std::atomic<bool> device_data_checks{env_is("MASKNORM_DEVICE_DATA_CHECKS", "1")};

const KernelTable& generic_kernels() {
  static const KernelTable table = MASKNORM_KERNEL_TABLE(masknorm::generic, "generic");
  return table;
}

}  // namespace

void register_cuda_backend(const CudaBackend& backend) {
  static const CudaBackend stored = backend;
  registered_cuda.store(&stored);
}

bool cuda_kernels_built() { return registered_cuda.load() != nullptr; }
const CudaBackend* cuda_backend() { return registered_cuda.load(); }

void force_generic_kernels(bool on) { force_generic.store(on); }
bool generic_kernels_forced() { return force_generic.load(); }

void use_fused_cuda_kernels(bool on) { fused_cuda.store(on); }
bool fused_cuda_kernels_enabled() { return fused_cuda.load() && cuda_kernels_built(); }

const KernelTable& kernels_for(const at::Device& device) {
  if (!force_generic.load()) {
    if (device.is_cpu()) return cpu::kernels();
    if (device.is_cuda() && fused_cuda.load()) {
      if (const CudaBackend* cuda = registered_cuda.load()) return *cuda->kernels;
    }
  }
  return generic_kernels();
}

std::string kernels_name(const at::Device& device) { return kernels_for(device).name; }

std::string kernels_for_device(const at::Device& device) { return kernels_name(device); }

void enable_device_data_checks(bool on) { device_data_checks.store(on); }

bool data_checks_enabled(const at::Device& device) {
  if (device.is_cpu()) return true;
  if (!device_data_checks.load()) return false;
  const CudaBackend* cuda = registered_cuda.load();
  return !(device.is_cuda() && cuda != nullptr && cuda->stream_is_capturing());
}

}  // namespace masknorm
