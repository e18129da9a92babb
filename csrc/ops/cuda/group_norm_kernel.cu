// Group norm (and instance norm) of CUDA tensors: the generic kernels, whose
// ATen ops run as CUDA kernels. Fused kernels take their place once they have
// run on a GPU; until then CUDA tensors get the reference implementation.
// Neighbours: ../generic/group_norm_kernel.cpp, ../cpu/group_norm_kernel.cpp,
// kernel_table.cu (registration).
#include "../kernels.h"

namespace masknorm::cuda {

void group_norm_forward(const GroupNormForwardArgs& a) { generic::group_norm_forward(a); }

void group_norm_backward(const GroupNormBackwardArgs& a) { generic::group_norm_backward(a); }

}  // namespace masknorm::cuda
