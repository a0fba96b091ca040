// rfsr::window_merge on CUDA: window attention output back to pixel rows (merge, unshift, crop) times the sigmoid
// gate, into rows padded with zero columns, in one pass. PyTorch needs a gather, a sigmoid and a strided product
// (the latter unvectorised: the gate's rows are wider than C) for the same result.
//
// A group of lanes per output pixel (as many as its vectors, up to a warp); columns past C are written as zeros.
#include "params.h"

#include "../common/elementwise.cuh"

#include <cstdint>

namespace rfsr {
namespace {

constexpr int kThreads = 256;

template <typename T, int kVec, bool kGate>
__global__ void __launch_bounds__(kThreads) window_merge_kernel(const WindowMergeParams p, int b0, unsigned pixels,
                                                                int lanes) {
  using PackT = Pack<T, kVec>;
  // A group of `lanes` lanes per output pixel: the index arithmetic once per pixel (32-bit within a launch,
  // pixels < 2^31), then the lanes stride over the row's vectors.
  const unsigned t = blockIdx.x * unsigned(kThreads) + threadIdx.x;
  const unsigned local = t / unsigned(lanes);
  if (local >= pixels) return;
  const int lane = int(t - local * unsigned(lanes));
  const unsigned row = local / unsigned(p.W);  // b_local * H + y
  const int x = int(local - row * unsigned(p.W));
  const int bl = int(row / unsigned(p.H));
  const int y = int(row - unsigned(bl) * unsigned(p.H));
  const int b = b0 + bl;
  const int64_t pixel = (int64_t(b) * p.H + y) * p.W + x;
  // position in the padded, shifted map: (y - shift) mod the padded size
  int py = y - p.shift_h, px = x - p.shift_w;
  if (py < 0) py += p.nh * p.wh;
  if (px < 0) px += p.nw * p.ww;
  const int wy = py / p.wh, wx = px / p.ww;
  const int64_t window = (int64_t(b) * p.nh + wy) * p.nw + wx;
  const int token = (py - wy * p.wh) * p.ww + (px - wx * p.ww);
  const PackT* __restrict__ src =
      reinterpret_cast<const PackT*>(static_cast<const T*>(p.windows) + window * p.win_stride + int64_t(token) * p.tok_stride);
  const PackT* __restrict__ gate =
      reinterpret_cast<const PackT*>(static_cast<const T*>(p.gate) + (kGate ? pixel * p.gate_pixel_stride : 0));
  PackT* __restrict__ out = reinterpret_cast<PackT*>(static_cast<T*>(p.out) + pixel * p.width);
  const int n_in = p.C / kVec, n_out = p.width / kVec;
#pragma unroll 2
  for (int c = lane; c < n_out; c += lanes) {
    PackT res;
    if (c >= n_in) {  // columns past C: zeros
#pragma unroll
      for (int e = 0; e < kVec; ++e) res.v[e] = Conv<T>::store(0.f);
    } else if constexpr (kGate) {
      const PackT v = src[c], g = gate[c];
#pragma unroll
      for (int e = 0; e < kVec; ++e) {
        // rounded where the unfused ops round: sigmoid(gate), then the product
        const float s = Conv<T>::load(Conv<T>::store(1.0f / (1.0f + expf(-Conv<T>::load(g.v[e])))));
        res.v[e] = Conv<T>::store(s * Conv<T>::load(v.v[e]));
      }
    } else {
      res = src[c];
    }
    out[c] = res;
  }
}

}  // namespace

cudaError_t window_merge(const WindowMergeParams& p, cudaStream_t stream) {
  if (p.B == 0 || p.H == 0 || p.W == 0) return cudaSuccess;
  if (p.C <= 0 || p.width < p.C || p.vec <= 0 || p.C % p.vec || p.width % p.vec) return cudaErrorInvalidValue;
  if (p.wh <= 0 || p.ww <= 0 || int64_t(p.nh) * p.wh < p.H || int64_t(p.nw) * p.ww < p.W) return cudaErrorInvalidValue;
  if (p.shift_h < 0 || p.shift_h >= p.nh * p.wh || p.shift_w < 0 || p.shift_w >= p.nw * p.ww) return cudaErrorInvalidValue;
  return dispatch_dtype(p.dtype, [&](auto t) {
    using T = decltype(t);
    const auto launch = [&](auto kvec, dim3 grid, int b0, unsigned pixels, int lanes) {
      constexpr int kVec = decltype(kvec)::value;
      if (p.gate != nullptr) {
        window_merge_kernel<T, kVec, true><<<grid, kThreads, 0, stream>>>(p, b0, pixels, lanes);
      } else {
        window_merge_kernel<T, kVec, false><<<grid, kThreads, 0, stream>>>(p, b0, pixels, lanes);
      }
    };
    return launch_rows<kThreads>(p.vec, p.B, int64_t(p.H) * p.W, p.width, lanes_for, launch);
  });
}

}  // namespace rfsr
