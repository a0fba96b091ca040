// rfsr::window_partition on CUDA: pad (reflect, bottom/right) + cyclic shift + window partition of pixel rows in one
// copy with vector accesses (see params.h for the mapping). A group of lanes per window token.
#include "params.h"

#include "../common/elementwise.cuh"

#include <cstdint>

namespace rfsr {
namespace {

constexpr int kThreads = 256;

// Padded, shifted position i of an axis of n pixels padded to `padded`: the source pixel.
__device__ __forceinline__ int source_pixel(int i, int shift, int padded, int n) {
  int j = i + shift;
  if (j >= padded) j -= padded;
  return j < n ? j : 2 * (n - 1) - j;
}

template <typename T, int kVec>
__global__ void __launch_bounds__(kThreads) window_partition_kernel(const WindowPartitionParams p, int b0,
                                                                    unsigned rows, int lanes) {
  using PackT = Pack<T, kVec>;
  // A group of `lanes` lanes per output row (window token): the index arithmetic once per row (32-bit within a
  // launch, rows < 2^31), then the lanes stride over the row's vectors.
  const unsigned t = blockIdx.x * unsigned(kThreads) + threadIdx.x;
  const unsigned row = t / unsigned(lanes);
  if (row >= rows) return;
  const int lane = int(t - row * unsigned(lanes));
  const unsigned N = unsigned(p.wh * p.ww);
  const unsigned token = row % N;
  unsigned w = row / N;
  const int wx = int(w % unsigned(p.nw));
  w /= unsigned(p.nw);
  const int wy = int(w % unsigned(p.nh));
  const int b = b0 + int(w / unsigned(p.nh));
  const int ty = int(token / unsigned(p.ww)), tx = int(token % unsigned(p.ww));
  const int y = source_pixel(wy * p.wh + ty, p.shift_h, p.nh * p.wh, p.H);
  const int x = source_pixel(wx * p.ww + tx, p.shift_w, p.nw * p.ww, p.W);
  const PackT* __restrict__ src = reinterpret_cast<const PackT*>(static_cast<const T*>(p.x) +
                                                                  ((int64_t(b) * p.H + y) * p.W + x) * p.pixel_stride);
  PackT* __restrict__ dst = reinterpret_cast<PackT*>(static_cast<T*>(p.out) +
                                                     (int64_t(b0) * p.nh * p.nw * N + row) * p.C);
  const int n = p.C / kVec;
#pragma unroll 4
  for (int c = lane; c < n; c += lanes) dst[c] = src[c];
}

}  // namespace

cudaError_t window_partition(const WindowPartitionParams& p, cudaStream_t stream) {
  if (p.B == 0) return cudaSuccess;
  if (p.H <= 0 || p.W <= 0 || p.C <= 0 || p.vec <= 0 || p.C % p.vec) return cudaErrorInvalidValue;
  // reflect padding needs fewer padded rows than pixels (as F.pad's 'reflect')
  if (p.wh <= 0 || p.ww <= 0 || p.nh * p.wh - p.H >= p.H || p.nw * p.ww - p.W >= p.W) return cudaErrorInvalidValue;
  if (p.shift_h < 0 || p.shift_h >= p.nh * p.wh || p.shift_w < 0 || p.shift_w >= p.nw * p.ww) return cudaErrorInvalidValue;
  return dispatch_dtype(p.dtype, [&](auto t) {
    const auto launch = [&](auto kvec, dim3 grid, int b0, unsigned rows, int lanes) {
      window_partition_kernel<decltype(t), decltype(kvec)::value><<<grid, kThreads, 0, stream>>>(p, b0, rows, lanes);
    };
    return launch_rows<kThreads>(p.vec, p.B, int64_t(p.nh) * p.nw * p.wh * p.ww, p.C, lanes_for, launch);
  });
}

}  // namespace rfsr
