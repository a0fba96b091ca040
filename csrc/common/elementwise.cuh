// Element conversions, vector packs and the dtype dispatch shared by the elementwise kernels of the model's inference
// path (csrc/layernorm, csrc/dwconv, csrc/windows): float32 arithmetic on float32, float16 and bfloat16 data.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

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

// Launches a row kernel (kThreads-thread blocks, a group of lanes(row_elems / vec) lanes per row) over B images of
// rows_per_image rows: launch(kvec, grid, b0, rows, lanes) launches the chunk of whole images from image b0, kvec
// being std::integral_constant<int, vec> (1, 2, 4 or 8, else cudaErrorInvalidValue). Chunks of fewer than 2^31
// threads keep the kernels' thread indices in 32 bits and the grid within its x limit.
template <int kThreads, typename Lanes, typename F>
cudaError_t launch_rows(int vec, int B, int64_t rows_per_image, int row_elems, Lanes&& lanes_for, F&& launch) {
  const auto chunks = [&](auto kvec) -> cudaError_t {
    const int lanes = lanes_for(row_elems / decltype(kvec)::value);
    const int64_t per_image = rows_per_image * lanes;
    if (per_image > int64_t(0x7fffffff) - kThreads) return cudaErrorInvalidValue;
    const int chunk = int(std::min<int64_t>(B, (int64_t(0x7fffffff) - kThreads) / per_image));
    for (int b0 = 0; b0 < B; b0 += chunk) {
      const int64_t threads = std::min(chunk, B - b0) * per_image;
      launch(kvec, dim3(unsigned((threads + kThreads - 1) / kThreads)), b0, unsigned(threads / lanes), lanes);
      const cudaError_t e = cudaGetLastError();
      if (e != cudaSuccess) return e;
    }
    return cudaSuccess;
  };
  switch (vec) {
    case 1: return chunks(std::integral_constant<int, 1>{});
    case 2: return chunks(std::integral_constant<int, 2>{});
    case 4: return chunks(std::integral_constant<int, 4>{});
    case 8: return chunks(std::integral_constant<int, 8>{});
  }
  return cudaErrorInvalidValue;
}

}  // namespace rfsr
