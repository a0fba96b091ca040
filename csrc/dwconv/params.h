// rfsr::depthwise_conv3x3 on CUDA: the parameters of one call (no torch types; csrc/dwconv_cuda.cpp fills them).
//
// out = act(depthwise 3x3 conv of x, zero padding 1, + bias) [+ x], channels-last: x and out are (B, H, W, C) rows
// of C contiguous channels. act is the identity or the exact (erf) GELU. Taps are float32 (3, 3, C), bias float32.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "../common/dtype.h"

namespace rfsr {

struct DwConvParams {
  const void* x = nullptr;
  const float* taps = nullptr;  // (3, 3, C)
  const float* bias = nullptr;  // (C,), or null
  void* out = nullptr;
  int64_t B = 0;
  int H = 0, W = 0, C = 0;
  bool gelu = false;
  bool residual = false;  // add x to the result
  ElemDtype dtype = ElemDtype::kFloat32;
  int vec = 1;  // channels per access (the binding picks the widest C and the pointers allow)
};

cudaError_t depthwise_conv3x3(const DwConvParams& p, cudaStream_t stream);

}  // namespace rfsr
