// Claims the `masknorm` op namespace. Each op's schemas are added by its own
// file (ops/<op>.cpp) with TORCH_LIBRARY_FRAGMENT, its CPU kernels are
// registered by ops/cpu/dispatch.cpp and its autograd by
// ops/autograd/<op>_autograd.cpp. Part of both the Python extension and the
// C++ library (CMakeLists.txt).
#include <torch/library.h>

TORCH_LIBRARY(masknorm, m) {}
