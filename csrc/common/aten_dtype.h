// ATen scalar type -> ElemDtype, for the CUDA bindings of the elementwise ops (csrc/*_cuda.cpp); the kernels they
// launch see no ATen.
#pragma once

#include <ATen/ATen.h>

#include "dtype.h"

namespace rfsr {

// The dtypes the elementwise kernels take (the bindings send others, float64 included, to the ATen implementations).
inline bool is_elem_dtype(at::ScalarType st) { return st == at::kFloat || st == at::kHalf || st == at::kBFloat16; }

// The kernels' dtype for st; a TypeError naming `op` (e.g. "rfsr::layer_norm") for any other.
inline ElemDtype elem_dtype(at::ScalarType st, const char* op) {
  switch (st) {
    case at::kFloat: return ElemDtype::kFloat32;
    case at::kHalf: return ElemDtype::kFloat16;
    case at::kBFloat16: return ElemDtype::kBFloat16;
    default: TORCH_CHECK_TYPE(false, op, " on CUDA takes float32, float16 or bfloat16, got ", c10::toString(st));
  }
}

}  // namespace rfsr
