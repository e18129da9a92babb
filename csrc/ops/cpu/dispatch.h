// Which build of the CPU kernels this process uses (see kernels.h).
#pragma once

#include "kernels.h"

#include <string>

namespace masknorm::cpu {

// The fastest kernel build this CPU runs: the one for the instruction set
// torch itself uses (at::get_cpu_capability(), which honours the
// ATEN_CPU_CAPABILITY environment variable) or the next lower one found,
// else the portable build. Chosen on first use.
const KernelTable& kernels();

// Why a faster build was not used ("" when the best one loaded).
const std::string& kernels_note();

}  // namespace masknorm::cpu
