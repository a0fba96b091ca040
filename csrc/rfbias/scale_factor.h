// The scaled query factor bias_q * bq_mult (rfbias_fold_scale), rounded once to the input dtype as the kernels' own
// staging rounds it: the backward's kernels read it from a workspace, the wgmma forward takes a shared factor so
// scaled instead of rescaling every query tile. Plain C++ in, launch on the given stream (scale_factor.cu).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "params.h"  // RfbiasDtype

namespace rfsr {

struct RfbiasScaleFactorParams {
  const void* src;  // (windows, H, N, R), R contiguous, with the strides below (elements; batch stride 0 if shared)
  void* dst;        // contiguous (windows, H, N, R)
  int64_t windows;
  int H, N, R;
  int64_t batch_stride, head_stride, row_stride;
  float mult;
  RfbiasDtype dtype;
};

cudaError_t rfbias_scale_factor(const RfbiasScaleFactorParams& p, cudaStream_t stream);

}  // namespace rfsr
