// Claims the `masknorm` op namespace (library.h says where each part of an op lives).
// Part of both the Python extension and the C++ library (build.json).
#include <torch/library.h>

TORCH_LIBRARY(masknorm, m) {}
