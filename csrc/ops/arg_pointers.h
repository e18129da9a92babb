// Raw pointers to the tensors of a kernel's Args struct (kernels.h), for the
// loops of the CPU (cpu/) and CUDA (cuda/) kernels; compiled by g++ and nvcc.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

namespace masknorm {

// An optional tensor's data, or nullptr when it is absent (undefined).
template <typename T>
T* data_or_null(const at::Tensor& t) {
  return t.defined() ? t.mutable_data_ptr<T>() : nullptr;
}

// A padding mask's elements, read as bytes: a bool tensor may hold bytes
// other than 0 and 1 (a uint8 tensor viewed as bool, a buffer from
// elsewhere), which torch reads as True when nonzero (c10::load<bool>). Read
// as `bool`, such a byte is undefined behaviour, and was in practice taken as
// padding by some loops and as valid by others. Test `!= 0`.
using MaskByte = uint8_t;
inline const MaskByte* mask_bytes(const at::Tensor& mask) {
  return mask.defined() ? reinterpret_cast<const MaskByte*>(mask.const_data_ptr<bool>()) : nullptr;
}

}  // namespace masknorm
