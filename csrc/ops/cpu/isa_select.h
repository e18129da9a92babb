// Which build of the CPU kernels this process uses. The kernels (cpu/*_kernel.cpp)
// are compiled portably into the extension and, on x86-64, once more per
// instruction set into libraries of their own (see kernel_table.cpp);
// isa_select.cpp loads the best one this processor runs.
#pragma once

#include "../kernels.h"

#include <string>

namespace masknorm::cpu {

MASKNORM_DECLARE_KERNELS

// The fastest kernel build this CPU runs: the one for the instruction set
// torch itself uses (at::get_cpu_capability(), which honours the
// ATEN_CPU_CAPABILITY environment variable) or the next lower one found,
// else the portable build. Chosen on first use.
const KernelTable& kernels();

// Why a faster build was not used ("" when the best one loaded).
const std::string& kernels_note();

}  // namespace masknorm::cpu

// The table of the build a translation unit belongs to (cpu/kernel_table.cpp).
extern "C" const masknorm::KernelTable* masknorm_cpu_kernel_table();
