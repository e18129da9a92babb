// The `masknorm` op namespace (claimed in library.cpp). Each op file
// (batch_norm.cpp, row_norm.cpp) adds its schemas with TORCH_LIBRARY_FRAGMENT
// and registers its entry for CompositeExplicitAutograd: one entry serves
// every device, and picks that device's kernels itself (kernels.h). Autograd
// is registered in autograd/, the fake kernels in python/masknorm/_ops.py.
#pragma once

#include <ATen/core/dispatch/Dispatcher.h>

namespace masknorm {

// The registered op `name` ("masknorm::layer_norm") with signature Sig, for
// the C++ API's calls through the dispatcher (autograd, tracing and every
// backend then apply to C++ callers as to Python ones).
template <typename Sig>
c10::TypedOperatorHandle<Sig> find_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Sig>();
}

}  // namespace masknorm
