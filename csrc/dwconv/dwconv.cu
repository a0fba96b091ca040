// rfsr::depthwise_conv3x3 on CUDA: SST's depthwise 3x3 convs (the FFN's, with GELU and its residual, and the
// gate's) in one pass over channels-last pixels. cuDNN's kernel plus PyTorch's separate bias add, GELU and residual
// add read and write the activation four times; here each output is written once.
//
// A thread owns kVec channels of kRows vertically adjacent pixels: it loads the kRows + 2 input rows of its 3
// columns at once (neighbouring threads' columns come from L1), holds the 9 taps of its channels in registers, and
// writes the kRows outputs.
#include "params.h"

#include "../common/elementwise.cuh"

#include <algorithm>
#include <cstdint>

namespace rfsr {
namespace {

constexpr int kThreads = 256;
constexpr int kRows = 4;

template <typename T, int kVec, bool kGelu, bool kResidual>
__global__ void __launch_bounds__(kThreads) dwconv3x3_kernel(const DwConvParams p) {
  using PackT = Pack<T, kVec>;
  // 32-bit index arithmetic (64-bit division is a long software sequence, and it was a large share of the
  // instructions): the launch keeps each call's thread count below 2^31.
  const unsigned nv = unsigned(p.C / kVec);
  const unsigned strips = unsigned((p.H + kRows - 1) / kRows);
  unsigned t = blockIdx.x * unsigned(kThreads) + threadIdx.x;
  if (t >= unsigned(p.B) * strips * unsigned(p.W) * nv) return;
  const int cv = int(t % nv);
  t /= nv;
  const int x = int(t % unsigned(p.W));
  t /= unsigned(p.W);
  const int y0 = int(t % strips) * kRows;
  const int64_t b = t / strips;
  const int c0 = cv * kVec;

  float w[9][kVec];
#pragma unroll
  for (int k = 0; k < 9; ++k) {
#pragma unroll
    for (int e = 0; e < kVec; ++e) w[k][e] = p.taps[k * p.C + c0 + e];
  }
  float acc[kRows][kVec], center[kRows][kVec];
#pragma unroll
  for (int o = 0; o < kRows; ++o) {
#pragma unroll
    for (int e = 0; e < kVec; ++e) {
      acc[o][e] = p.bias != nullptr ? p.bias[c0 + e] : 0.f;
      center[o][e] = 0.f;
    }
  }
  // All (kRows + 2) x 3 input vectors first (zeros outside the image), so their loads are in flight together.
  const T* base = static_cast<const T*>(p.x) + b * p.H * int64_t(p.W) * p.C + c0;
  PackT in[kRows + 2][3];
#pragma unroll
  for (int r = 0; r < kRows + 2; ++r) {
    const int yy = y0 - 1 + r;
#pragma unroll
    for (int kx = 0; kx < 3; ++kx) {
      const int xx = x - 1 + kx;
      if (yy >= 0 && yy < p.H && xx >= 0 && xx < p.W) {
        in[r][kx] = *reinterpret_cast<const PackT*>(base + (int64_t(yy) * p.W + xx) * p.C);
      } else {
#pragma unroll
        for (int e = 0; e < kVec; ++e) in[r][kx].v[e] = Conv<T>::store(0.f);
      }
    }
  }
#pragma unroll
  for (int r = 0; r < kRows + 2; ++r) {
#pragma unroll
    for (int kx = 0; kx < 3; ++kx) {
      float v[kVec];
#pragma unroll
      for (int e = 0; e < kVec; ++e) v[e] = Conv<T>::load(in[r][kx].v[e]);
#pragma unroll
      for (int o = 0; o < kRows; ++o) {  // output row y0 + o takes input row r with tap row ky = r - o
        const int ky = r - o;
        if (ky < 0 || ky > 2) continue;
#pragma unroll
        for (int e = 0; e < kVec; ++e) acc[o][e] += v[e] * w[ky * 3 + kx][e];
        if (kResidual && ky == 1 && kx == 1) {
#pragma unroll
          for (int e = 0; e < kVec; ++e) center[o][e] = v[e];
        }
      }
    }
  }
  T* out = static_cast<T*>(p.out) + b * p.H * int64_t(p.W) * p.C + c0;
#pragma unroll
  for (int o = 0; o < kRows; ++o) {
    const int y = y0 + o;
    if (y >= p.H) break;
    PackT res;
#pragma unroll
    for (int e = 0; e < kVec; ++e) {
      // rounded where the unfused ops round: the conv output, the GELU, then x + gelu(...)
      float a = Conv<T>::load(Conv<T>::store(acc[o][e]));
      if constexpr (kGelu) a = Conv<T>::load(Conv<T>::store(0.5f * a * (1.0f + erff(a * 0.70710678118654752f))));
      if constexpr (kResidual) a += center[o][e];
      res.v[e] = Conv<T>::store(a);
    }
    *reinterpret_cast<PackT*>(out + (int64_t(y) * p.W + x) * p.C) = res;
  }
}

template <typename T, int kVec>
cudaError_t launch(const DwConvParams& p_all, cudaStream_t stream) {
  // Images in chunks whose thread count fits the kernel's 32-bit indices.
  const int64_t per_image = int64_t((p_all.H + kRows - 1) / kRows) * p_all.W * (p_all.C / kVec);
  if (per_image > 0x7fffffff) return cudaErrorInvalidValue;
  const int64_t chunk = std::max<int64_t>(1, 0x7fffffff / per_image);
  const int64_t image = int64_t(p_all.H) * p_all.W * p_all.C;
  for (int64_t b0 = 0; b0 < p_all.B; b0 += chunk) {
    DwConvParams p = p_all;
    p.B = std::min<int64_t>(chunk, p_all.B - b0);
    p.x = static_cast<const T*>(p_all.x) + b0 * image;
    p.out = static_cast<T*>(p_all.out) + b0 * image;
    const dim3 grid(static_cast<unsigned>((p.B * per_image + kThreads - 1) / kThreads));
    if (p.gelu && p.residual) {
      dwconv3x3_kernel<T, kVec, true, true><<<grid, kThreads, 0, stream>>>(p);
    } else if (p.gelu) {
      dwconv3x3_kernel<T, kVec, true, false><<<grid, kThreads, 0, stream>>>(p);
    } else if (p.residual) {
      dwconv3x3_kernel<T, kVec, false, true><<<grid, kThreads, 0, stream>>>(p);
    } else {
      dwconv3x3_kernel<T, kVec, false, false><<<grid, kThreads, 0, stream>>>(p);
    }
    const cudaError_t e = cudaGetLastError();
    if (e != cudaSuccess) return e;
  }
  return cudaSuccess;
}

template <typename T>
cudaError_t dispatch_vec(const DwConvParams& p, cudaStream_t stream) {
  switch (p.vec) {
    case 1: return launch<T, 1>(p, stream);
    case 2: return launch<T, 2>(p, stream);
    case 4: return launch<T, 4>(p, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace

cudaError_t depthwise_conv3x3(const DwConvParams& p, cudaStream_t stream) {
  if (p.B == 0 || p.H == 0 || p.W == 0) return cudaSuccess;
  if (p.C <= 0 || p.vec <= 0 || p.C % p.vec) return cudaErrorInvalidValue;
  switch (p.dtype) {
    case DwDtype::kFloat32: return dispatch_vec<float>(p, stream);
    case DwDtype::kFloat16: return dispatch_vec<__half>(p, stream);
    case DwDtype::kBFloat16: return dispatch_vec<__nv_bfloat16>(p, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace rfsr
