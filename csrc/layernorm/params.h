// rfsr::layer_norm on CUDA: the parameters of one call (no torch types; csrc/layer_norm_cuda.cpp fills them).
//
// Row-wise LayerNorm over the last dim of `rows` rows of `cols` elements, optionally of the sum x + y, written into
// rows of `width` >= cols elements whose extra columns are zero (so a GEMM that follows reads 16-byte-aligned rows
// and multiplies the extra columns by zero weights). The sum, when there is a y, is written too (in the input
// dtype, and normalised after that rounding, as the unfused `s = x + y; layer_norm(s)` does).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "../common/dtype.h"

namespace rfsr {

struct LayerNormParams {
  const void* x = nullptr;
  const void* y = nullptr;  // null: no residual
  const void* weight = nullptr;
  const void* bias = nullptr;
  void* out = nullptr;  // rows x width, contiguous
  void* sum = nullptr;  // rows x cols, contiguous; written only with a y
  int64_t rows = 0;
  int cols = 0;
  int norm_cols = 0;  // the mean and variance are those of the first norm_cols (<= cols) elements of each row
  int width = 0;
  int64_t x_row_stride = 0;  // elements; the last dim is contiguous
  int64_t y_row_stride = 0;
  float eps = 0.f;
  ElemDtype dtype = ElemDtype::kFloat32;        // x, y, out, sum
  ElemDtype param_dtype = ElemDtype::kFloat32;  // weight and bias: float32 or the dtype of x
  int vec = 1;                                  // elements per access (the binding picks the widest all pointers allow)
};

// The widest row any vector width handles: 256 accesses of `vec` elements.
constexpr int kLayerNormMaxAccesses = 256;

cudaError_t layer_norm_rows(const LayerNormParams& p, cudaStream_t stream);

}  // namespace rfsr
