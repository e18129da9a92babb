// Chooses the CPU kernel build at run time (kernels_for() in
// ../kernel_registry.cpp serves CPU tensors from it). Each instruction-set
// build is a shared library next to this one, named after it with the suffix
// from build.json: `_C.<suffix>.so` -> `_C_cpu_avx2.<suffix>.so`, and
// `libmasknorm.so` -> `libmasknorm_cpu_avx2.so`. Libraries are loaded
// RTLD_LOCAL and export only their table, so code compiled for AVX2/AVX512
// can never be picked up by anything running on a CPU without them.
#include "isa_select.h"

#include "masknorm/ops.h"

#include <ATen/Context.h>

#include <string>
#include <vector>

#ifndef _WIN32
#include <dlfcn.h>
#endif

// The name part between a library and its instruction-set builds (build.json).
#ifndef MASKNORM_ISA_LIBRARY_INFIX
#define MASKNORM_ISA_LIBRARY_INFIX "_cpu_"
#endif

namespace masknorm::cpu {
namespace {

struct Selection {
  const KernelTable* table = nullptr;
  std::string note;
};

// Instruction sets worth trying for torch's CPU capability, best first.
std::vector<std::string> candidate_isas() {
  const std::string capability = at::get_cpu_capability();
  if (capability == "AVX512") return {"avx512", "avx2"};
  if (capability == "AVX2") return {"avx2"};
  return {};
}

#ifndef _WIN32
std::string this_library_path() {
  Dl_info info{};
  if (dladdr(reinterpret_cast<void*>(&candidate_isas), &info) == 0 || info.dli_fname == nullptr) return {};
  return info.dli_fname;
}

std::string sibling_library(const std::string& self, const std::string& isa) {
  const size_t slash = self.rfind('/');
  const size_t name_begin = slash == std::string::npos ? 0 : slash + 1;
  size_t dot = self.find('.', name_begin);
  if (dot == std::string::npos) dot = self.size();
  return self.substr(0, dot) + MASKNORM_ISA_LIBRARY_INFIX + isa + self.substr(dot);
}

const KernelTable* load_table(const std::string& path, std::string& why_not) {
  void* handle = dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL);
  if (handle == nullptr) {
    const char* error = dlerror();
    why_not = error ? error : ("cannot load " + path);
    return nullptr;
  }
  using TableFn = const KernelTable* (*)();
  auto table_fn = reinterpret_cast<TableFn>(dlsym(handle, "masknorm_cpu_kernel_table"));
  const KernelTable* table = table_fn ? table_fn() : nullptr;
  if (table == nullptr || table->version != KernelTable::kVersion || table->abi != KernelTable::kAbi) {
    why_not = path + " was built from other sources (kernel table version " +
        std::to_string(KernelTable::kVersion) + ", abi " + std::to_string(KernelTable::kAbi) + " expected)";
    dlclose(handle);
    return nullptr;
  }
  return table;  // the library stays loaded for the life of the process
}
#endif

Selection select() {
  Selection s;
#ifndef _WIN32
  const std::string self = this_library_path();
  for (const std::string& isa : candidate_isas()) {
    std::string why_not;
    if (const KernelTable* table = load_table(sibling_library(self, isa), why_not)) {
      s.table = table;
      return s;
    }
    s.note += (s.note.empty() ? "" : "; ") + isa + " kernels not used: " + why_not;
  }
#endif
  s.table = masknorm_cpu_kernel_table();
  return s;
}

const Selection& selection() {
  static const Selection s = select();
  return s;
}

}  // namespace

const KernelTable& kernels() { return *selection().table; }
const std::string& kernels_note() { return selection().note; }

}  // namespace masknorm::cpu

std::string masknorm::cpu_kernels_isa() { return masknorm::cpu::kernels().name; }
