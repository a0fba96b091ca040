// The element dtype of the elementwise kernels of the model's inference path (csrc/layernorm, csrc/dwconv,
// csrc/windows): one enum for their params structs. Plain C++ (no CUDA, no ATen), as the bindings fill the structs;
// csrc/common/aten_dtype.h maps ATen's scalar types to it, csrc/common/elementwise.cuh dispatches on it.
#pragma once

namespace rfsr {

enum class ElemDtype : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

}  // namespace rfsr
