// rfsr::layer_norm on CUDA: a group of L lanes per row (a power of two, at most a warp: lanes_for), every value
// held in registers between the two reductions (mean, then the centred sum of squares, which is exact enough in
// float32 where the one-pass E[x^2] - mean^2 is not). PyTorch's LayerNorm kernel spends a whole block and two
// block-wide reductions on each row, which leaves SST's short rows (48 to 224 channels) latency-bound at a fifth of
// the copy bandwidth or less.
#include "params.h"

#include "../common/elementwise.cuh"

#include <cstdint>

namespace rfsr {
namespace {

constexpr int kThreads = 128;
constexpr int kMaxIters = 8;  // accesses per lane: rows of up to 32 * 8 accesses (kLayerNormMaxAccesses)
static_assert(32 * kMaxIters == kLayerNormMaxAccesses, "row limit");

// Lanes for a row of n_acc accesses: the power of two (at most a warp) whose lanes x accesses-per-lane slots waste
// the fewest, up to 4 accesses a lane (wider rows: a warp). Loads in flight per SM, which set the bandwidth of these
// short rows, are bounded by the registers holding them: idle slots hold nothing (SST's 23 accesses take 8 lanes x
// 3, where 32 lanes x 1 left 9 of 32 idle), and the fewer lanes, the more rows a warp has in flight.
__host__ __device__ constexpr int lanes_for(int n_acc) {
  int best = 32, best_slots = 32 * ((n_acc + 31) / 32);
  for (int lanes = 16; lanes >= 1; lanes /= 2) {
    const int iters = (n_acc + lanes - 1) / lanes;
    if (iters > 4) break;
    if (lanes * iters < best_slots) best = lanes, best_slots = lanes * iters;  // ties keep more lanes
  }
  return best;
}

__device__ __forceinline__ float group_sum(float v, int lanes) {
  // xor partners stay inside the aligned group of `lanes` lanes; every lane of the warp takes part
  for (int off = lanes / 2; off > 0; off /= 2) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}

// kIters: accesses per lane, the row's accesses over its lanes rounded up to 1, 2, 3, 4 or 8 (values of a row stay in
// registers: sized for the widest row, they would cut the occupancy, and with it the loads in flight, to a quarter).
template <typename T, typename P, int kVec, int kIters, bool kResidual>
__global__ void __launch_bounds__(kThreads) layer_norm_kernel(const LayerNormParams p) {
  using PackT = Pack<T, kVec>;
  using PackP = Pack<P, kVec>;
  const int lanes = lanes_for(p.cols / kVec);
  const int groups_per_block = kThreads / lanes;
  const int lane = threadIdx.x % lanes;
  const int n_acc = p.cols / kVec;
  const int n_out = p.width / kVec;
  const float inv_cols = 1.0f / float(p.norm_cols);

  for (int64_t row = int64_t(blockIdx.x) * groups_per_block + threadIdx.x / lanes;
       row - threadIdx.x / lanes < p.rows; row += int64_t(gridDim.x) * groups_per_block) {
    const bool valid = row < p.rows;  // lanes past the last row still join the shuffles
    const T* x = static_cast<const T*>(p.x) + row * p.x_row_stride;
    float v[kIters][kVec];
    float s = 0.f;
#pragma unroll
    for (int it = 0; it < kIters; ++it) {
      const int a = lane + it * lanes;
      if (valid && a < n_acc) {
        const PackT xv = reinterpret_cast<const PackT*>(x)[a];
        if constexpr (kResidual) {
          const T* y = static_cast<const T*>(p.y) + row * p.y_row_stride;
          const PackT yv = reinterpret_cast<const PackT*>(y)[a];
          PackT sv;
#pragma unroll
          for (int e = 0; e < kVec; ++e) {
            sv.v[e] = Conv<T>::store(Conv<T>::load(xv.v[e]) + Conv<T>::load(yv.v[e]));
            v[it][e] = Conv<T>::load(sv.v[e]);  // normalise the rounded sum, as the unfused ops do
          }
          reinterpret_cast<PackT*>(static_cast<T*>(p.sum) + row * p.cols)[a] = sv;
        } else {
#pragma unroll
          for (int e = 0; e < kVec; ++e) v[it][e] = Conv<T>::load(xv.v[e]);
        }
#pragma unroll
        for (int e = 0; e < kVec; ++e) s += a * kVec + e < p.norm_cols ? v[it][e] : 0.f;
      }
    }
    const float mean = group_sum(s, lanes) * inv_cols;
    float q = 0.f;
#pragma unroll
    for (int it = 0; it < kIters; ++it) {
      const int a = lane + it * lanes;
      if (valid && a < n_acc) {
#pragma unroll
        for (int e = 0; e < kVec; ++e) {
          const float d = a * kVec + e < p.norm_cols ? v[it][e] - mean : 0.f;
          q += d * d;
        }
      }
    }
    const float rstd = rsqrtf(group_sum(q, lanes) * inv_cols + p.eps);
    if (!valid) continue;
    PackT* out = reinterpret_cast<PackT*>(static_cast<T*>(p.out) + row * p.width);
#pragma unroll
    for (int it = 0; it < kIters; ++it) {
      const int a = lane + it * lanes;
      if (a < n_acc) {
        const PackP w = reinterpret_cast<const PackP*>(p.weight)[a];
        const PackP b = reinterpret_cast<const PackP*>(p.bias)[a];
        PackT o;
#pragma unroll
        for (int e = 0; e < kVec; ++e) {
          o.v[e] = Conv<T>::store((v[it][e] - mean) * rstd * Conv<P>::load(w.v[e]) + Conv<P>::load(b.v[e]));
        }
        out[a] = o;
      }
    }
    for (int a = n_acc + lane; a < n_out; a += lanes) {  // the padding columns
      PackT z;
#pragma unroll
      for (int e = 0; e < kVec; ++e) z.v[e] = Conv<T>::store(0.f);
      out[a] = z;
    }
  }
}

template <typename T, typename P, int kVec, int kIters>
cudaError_t launch(const LayerNormParams& p, cudaStream_t stream) {
  const int64_t groups_per_block = kThreads / lanes_for(p.cols / kVec);
  const int64_t blocks = (p.rows + groups_per_block - 1) / groups_per_block;
  const unsigned grid = unsigned(blocks < (int64_t(1) << 30) ? blocks : (int64_t(1) << 30));
  if (p.y != nullptr) {
    layer_norm_kernel<T, P, kVec, kIters, true><<<grid, kThreads, 0, stream>>>(p);
  } else {
    layer_norm_kernel<T, P, kVec, kIters, false><<<grid, kThreads, 0, stream>>>(p);
  }
  return cudaGetLastError();
}

template <typename T, typename P, int kVec>
cudaError_t dispatch_iters(const LayerNormParams& p, cudaStream_t stream) {
  const int n_acc = p.cols / kVec;
  const int iters = (n_acc + lanes_for(n_acc) - 1) / lanes_for(n_acc);
  if (iters <= 1) return launch<T, P, kVec, 1>(p, stream);
  if (iters <= 2) return launch<T, P, kVec, 2>(p, stream);
  if (iters <= 3) return launch<T, P, kVec, 3>(p, stream);
  if (iters <= 4) return launch<T, P, kVec, 4>(p, stream);
  return launch<T, P, kVec, kMaxIters>(p, stream);
}

template <typename T, typename P>
cudaError_t dispatch_vec(const LayerNormParams& p, cudaStream_t stream) {
  constexpr int kMaxVec = 16 / int(sizeof(T));
  switch (p.vec) {
    case 1: return dispatch_iters<T, P, 1>(p, stream);
    case 2: return dispatch_iters<T, P, 2>(p, stream);
    case 4: return dispatch_iters<T, P, 4>(p, stream);
    case 8: if constexpr (kMaxVec >= 8) return dispatch_iters<T, P, 8>(p, stream); else return cudaErrorInvalidValue;
    default: return cudaErrorInvalidValue;
  }
}

template <typename T>
cudaError_t dispatch_param(const LayerNormParams& p, cudaStream_t stream) {
  if (p.param_dtype == ElemDtype::kFloat32) return dispatch_vec<T, float>(p, stream);
  if (p.param_dtype != p.dtype) return cudaErrorInvalidValue;
  return dispatch_vec<T, T>(p, stream);
}

}  // namespace

cudaError_t layer_norm_rows(const LayerNormParams& p, cudaStream_t stream) {
  if (p.rows == 0) return cudaSuccess;
  if (p.cols <= 0 || p.vec <= 0 || p.cols % p.vec || p.width % p.vec || p.width < p.cols || p.norm_cols <= 0 ||
      p.norm_cols > p.cols ||
      p.cols / p.vec > kLayerNormMaxAccesses) {
    return cudaErrorInvalidValue;
  }
  return dispatch_dtype(p.dtype, [&](auto t) { return dispatch_param<decltype(t)>(p, stream); });
}

}  // namespace rfsr
