// The kernel table of one build of the CPU kernels (kernels.h lists them).
// This file and cpu/*_kernel.cpp make up an instruction-set library
// (`_C_cpu_avx2`, `libmasknorm_cpu_avx512`, ...: build.json); the portable
// build inside the extension leaves MASKNORM_CPU_ISA unset.
#include "isa_select.h"

#include <c10/macros/Export.h>

#ifndef MASKNORM_CPU_ISA
#define MASKNORM_CPU_ISA "default"
#endif

extern "C" C10_EXPORT const masknorm::KernelTable* masknorm_cpu_kernel_table() {
  static const masknorm::KernelTable table = MASKNORM_KERNEL_TABLE(masknorm::cpu, MASKNORM_CPU_ISA);
  return &table;
}
