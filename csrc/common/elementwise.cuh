// Element conversions, vector packs and the dtype dispatch shared by the elementwise kernels of the model's inference
// path (csrc/layernorm, csrc/dwconv, csrc/windows): float32 arithmetic on float32, float16 and bfloat16 data.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "dtype.h"

namespace rfsr {

template <typename T> struct Conv;
template <> struct Conv<float> {
  static __device__ __forceinline__ float load(float v) { return v; }
  static __device__ __forceinline__ float store(float v) { return v; }
};
template <> struct Conv<__half> {
  static __device__ __forceinline__ float load(__half v) { return __half2float(v); }
  static __device__ __forceinline__ __half store(float v) { return __float2half_rn(v); }
};
template <> struct Conv<__nv_bfloat16> {
  static __device__ __forceinline__ float load(__nv_bfloat16 v) { return __bfloat162float(v); }
  static __device__ __forceinline__ __nv_bfloat16 store(float v) { return __float2bfloat16_rn(v); }
};

// kVec elements moved as one access of kVec * sizeof(T) bytes.
template <typename T, int kVec>
struct alignas(sizeof(T) * kVec) Pack {
  T v[kVec];
};

// Calls f with a value of dt's element type (f(float{}), f(__half{}) or f(__nv_bfloat16{})): a launcher's generic
// lambda takes the type as decltype(t) and instantiates its kernels for each. cudaErrorInvalidValue for any other dt.
template <typename F>
cudaError_t dispatch_dtype(ElemDtype dt, F&& f) {
  switch (dt) {
    case ElemDtype::kFloat32: return f(float{});
    case ElemDtype::kFloat16: return f(__half{});
    case ElemDtype::kBFloat16: return f(__nv_bfloat16{});
  }
  return cudaErrorInvalidValue;
}

}  // namespace rfsr
