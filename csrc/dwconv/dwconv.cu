// rfsr::depthwise_conv3x3 on CUDA: SST's depthwise 3x3 convs (the FFN's, with GELU and its residual, and the
// gate's) in one pass over channels-last pixels. cuDNN's kernel plus PyTorch's separate bias add, GELU and residual
// add read and write the activation four times; here each output is written once.
//
// A block computes a tile of kTileH x kTileW pixels and kGroup * kVec channels: it first copies the tile with its
// one-pixel halo into shared memory (each input element is read from memory about 1.2 times, where per-thread
// neighbourhood loads read it 4.5 times through L2), then each thread walks down one column of kVec channels,
// keeping the partial sums of the three output rows an input row contributes to in registers.
#include "params.h"

#include "../common/elementwise.cuh"

#include <algorithm>
#include <cstdint>
#include <type_traits>

namespace rfsr {
namespace {

constexpr int kTileW = 32;  // pixels per tile row
constexpr int kTileH = 16;  // tile rows
constexpr int kGroup = 8;   // channel vectors per tile
constexpr int kThreads = kTileW * kGroup;

__device__ __forceinline__ float gelu(float a) { return 0.5f * a * (1.0f + erff(a * 0.70710678118654752f)); }

template <typename T, int kVec, bool kGelu, bool kResidual>
__global__ void __launch_bounds__(kThreads, 3) dwconv3x3_kernel(const DwConvParams p) {
  using PackT = Pack<T, kVec>;
  __shared__ PackT tile[kTileH + 2][kTileW + 2][kGroup];  // (halo row, halo column, channel vector)

  // block -> (column tile, row tile, channel group, image), 32-bit (the launch keeps the block count below 2^31)
  const unsigned tiles_x = unsigned((p.W + kTileW - 1) / kTileW), tiles_y = unsigned((p.H + kTileH - 1) / kTileH);
  const unsigned groups = unsigned((p.C / kVec + kGroup - 1) / kGroup);
  unsigned blk = blockIdx.x;
  const int x0 = int(blk % tiles_x) * kTileW;
  blk /= tiles_x;
  const int y0 = int(blk % tiles_y) * kTileH;
  blk /= tiles_y;
  const int g = int(blk % groups);
  const int64_t b = blk / groups;
  const int nv = p.C / kVec;
  const int64_t image = int64_t(p.H) * p.W * p.C;
  const T* src = static_cast<const T*>(p.x) + b * image;

  // 1. The tile and its halo (zeros outside the image and past the channels), copied asynchronously (cp.async: no
  //    registers held, all of a thread's copies in flight at once; zero-filled where the source is outside).
  for (int i = threadIdx.x; i < (kTileH + 2) * (kTileW + 2) * kGroup; i += kThreads) {
    const int cv = i % kGroup, col = (i / kGroup) % (kTileW + 2), row = i / (kGroup * (kTileW + 2));
    const int y = y0 - 1 + row, x = x0 - 1 + col, v = g * kGroup + cv;
    const bool inside = y >= 0 && y < p.H && x >= 0 && x < p.W && v < nv;
    const T* from = inside ? src + (int64_t(y) * p.W + x) * p.C + v * kVec : src;
    if constexpr (sizeof(PackT) >= 4) {
      const unsigned to = static_cast<unsigned>(__cvta_generic_to_shared(&tile[row][col][cv]));
      asm volatile("cp.async.ca.shared.global [%0], [%1], %2, %3;\n" ::"r"(to), "l"(from), "n"(int(sizeof(PackT))),
                   "r"(inside ? int(sizeof(PackT)) : 0));
    } else {  // 2-byte vectors: below cp.async's smallest copy
      PackT val;
      val.v[0] = inside ? *from : Conv<T>::store(0.f);
      tile[row][col][cv] = val;
    }
  }
  if constexpr (sizeof(PackT) >= 4) asm volatile("cp.async.wait_all;\n" ::);
  __syncthreads();

  // 2. Each thread: column `col`, channel vector `cv`, rows y0 .. y0 + kTileH - 1.
  const int cv = threadIdx.x % kGroup, col = threadIdx.x / kGroup;
  const int v = g * kGroup + cv, x = x0 + col;
  if (v >= nv || x >= p.W) return;
  const int c0 = v * kVec;
  float w[9][kVec], bias[kVec];
#pragma unroll
  for (int k = 0; k < 9; ++k) {
#pragma unroll
    for (int e = 0; e < kVec; ++e) w[k][e] = p.taps[k * p.C + c0 + e];
  }
#pragma unroll
  for (int e = 0; e < kVec; ++e) bias[e] = p.bias != nullptr ? p.bias[c0 + e] : 0.f;
  T* out = static_cast<T*>(p.out) + b * image + int64_t(x) * p.C + c0;

  // Input row r (halo coordinates) feeds output rows r - 2, r - 1 and r with tap rows 2, 1 and 0: sums of output
  // rows r - 2 (done after this row), r - 1 and r are live; the residual of output row o is input row o + 1.
  float acc_a[kVec], acc_b[kVec], center[kVec];
#pragma unroll
  for (int e = 0; e < kVec; ++e) acc_a[e] = acc_b[e] = center[e] = 0.f;
#pragma unroll
  for (int r = 0; r < kTileH + 2; ++r) {
    float in[3][kVec];
#pragma unroll
    for (int kx = 0; kx < 3; ++kx) {
      const PackT pk = tile[r][col + kx][cv];
#pragma unroll
      for (int e = 0; e < kVec; ++e) in[kx][e] = Conv<T>::load(pk.v[e]);
    }
    float acc_c[kVec];
#pragma unroll
    for (int e = 0; e < kVec; ++e) {
      acc_c[e] = bias[e];
#pragma unroll
      for (int kx = 0; kx < 3; ++kx) {
        acc_a[e] += in[kx][e] * w[6 + kx][e];
        acc_b[e] += in[kx][e] * w[3 + kx][e];
        acc_c[e] += in[kx][e] * w[kx][e];
      }
    }
    if (r >= 2) {  // output row r - 2 is complete
      const int y = y0 + r - 2;
      if (y < p.H) {
        PackT res;
#pragma unroll
        for (int e = 0; e < kVec; ++e) {
          // rounded where the unfused ops round: the conv output, the GELU, then x + gelu(...)
          float a = Conv<T>::load(Conv<T>::store(acc_a[e]));
          if constexpr (kGelu) a = Conv<T>::load(Conv<T>::store(gelu(a)));
          if constexpr (kResidual) a += center[e];
          res.v[e] = Conv<T>::store(a);
        }
        *reinterpret_cast<PackT*>(out + int64_t(y) * p.W * p.C) = res;
      }
    }
#pragma unroll
    for (int e = 0; e < kVec; ++e) {
      acc_a[e] = acc_b[e];
      acc_b[e] = acc_c[e];
      center[e] = in[1][e];  // input row r is the residual of output row r - 1, finished with the next row
    }
  }
}

// f(std::true_type{}) or f(std::false_type{}): a runtime flag as a template argument.
template <typename F>
void with_flag(bool flag, F&& f) {
  if (flag) {
    f(std::true_type{});
  } else {
    f(std::false_type{});
  }
}

template <typename T, int kVec>
cudaError_t launch(const DwConvParams& p_all, cudaStream_t stream) {
  // Images in chunks whose block count fits the kernel's 32-bit block index.
  const int64_t per_image = int64_t((p_all.W + kTileW - 1) / kTileW) * ((p_all.H + kTileH - 1) / kTileH) *
                            ((p_all.C / kVec + kGroup - 1) / kGroup);
  if (per_image > 0x7fffffff) return cudaErrorInvalidValue;
  const int64_t chunk = std::max<int64_t>(1, 0x7fffffff / per_image);
  const int64_t image = int64_t(p_all.H) * p_all.W * p_all.C;
  for (int64_t b0 = 0; b0 < p_all.B; b0 += chunk) {
    DwConvParams p = p_all;
    p.B = std::min<int64_t>(chunk, p_all.B - b0);
    p.x = static_cast<const T*>(p_all.x) + b0 * image;
    p.out = static_cast<T*>(p_all.out) + b0 * image;
    const dim3 grid(static_cast<unsigned>(p.B * per_image));
    with_flag(p.gelu, [&](auto gelu) {
      with_flag(p.residual, [&](auto residual) {
        dwconv3x3_kernel<T, kVec, decltype(gelu)::value, decltype(residual)::value><<<grid, kThreads, 0, stream>>>(p);
      });
    });
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
    case 4:  // 8-byte accesses at most: the shared-memory tile must stay under the 48 KiB of a static array
      if constexpr (sizeof(T) <= 2) return launch<T, 4>(p, stream);
      return cudaErrorInvalidValue;
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace

cudaError_t depthwise_conv3x3(const DwConvParams& p, cudaStream_t stream) {
  if (p.B == 0 || p.H == 0 || p.W == 0) return cudaSuccess;
  if (p.C <= 0 || p.vec <= 0 || p.C % p.vec) return cudaErrorInvalidValue;
  return dispatch_dtype(p.dtype, [&](auto t) { return dispatch_vec<decltype(t)>(p, stream); });
}

}  // namespace rfsr
