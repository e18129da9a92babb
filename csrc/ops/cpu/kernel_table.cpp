// The kernel table of this build of the CPU kernels (see kernels.h).
// MASKNORM_CPU_ISA names the instruction set the build enables; the portable
// build inside the extension leaves it unset.
#include "kernels.h"

#include <c10/macros/Export.h>

#ifndef MASKNORM_CPU_ISA
#define MASKNORM_CPU_ISA "default"
#endif

extern "C" C10_EXPORT const masknorm::cpu::KernelTable* masknorm_cpu_kernel_table() {
  using namespace masknorm::cpu;
  static const KernelTable table{
      KernelTable::kVersion,
      MASKNORM_CPU_ISA,
      &batch_norm_forward_cpu,
      &batch_norm_backward_cpu,
      &batch_norm_update_running_stats_cpu,
      &layer_norm_forward_cpu,
      &layer_norm_backward_cpu,
      &rms_norm_forward_cpu,
      &rms_norm_backward_cpu,
  };
  return &table;
}
