// Element conversions and vector packs shared by the elementwise kernels of the model's inference path
// (csrc/layernorm, csrc/dwconv): float32 arithmetic on float32, float16 and bfloat16 data.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

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

}  // namespace rfsr
