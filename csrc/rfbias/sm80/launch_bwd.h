// Host-side launch of the sm80 backward kernels for one (dtype, kDqk, kDv) bucket: prep, dK/dV, dQ, reduction
// (the binding has filled bq_scaled: rfbias/scale_factor.h).
// All launches go to `stream`; the workspace pointers in `p` were allocated by the binding.
#pragma once

#include <algorithm>

#include "../params_bwd.h"
#include "bwd_kernel.h"
#ifdef RFSR_SM90_BWD
#include "../sm90/bwd_kernel.h"
#endif

namespace rfsr {
namespace sm80 {

template <class Kernel>
cudaError_t launch_tiles(Kernel kernel, int64_t grid, int threads, int smem, const RfbiasBwdParams& p,
                         cudaStream_t stream) {
  if (grid <= 0) return cudaSuccess;
  if (grid > 0x7fffffffLL) return cudaErrorInvalidConfiguration;
  if (smem > 48 * 1024) {
    cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
    if (e != cudaSuccess) return e;
  }
  kernel<<<dim3(unsigned(grid)), dim3(threads), smem, stream>>>(p);
  return cudaGetLastError();
}

inline unsigned elementwise_grid(int64_t n, int threads) {
  const int64_t blocks = (n + threads - 1) / threads;
  return unsigned(std::max<int64_t>(1, std::min<int64_t>(blocks, 65535)));
}

template <typename Element, int kDqk, int kDv>
cudaError_t run_bwd(const RfbiasBwdParams& p, cudaStream_t stream) {
  using Traits = BwdTraitsSm80<Element, kDqk, kDv>;
  const int64_t rows = int64_t(p.B) * p.H * p.N;
  if (rows <= 0) return cudaSuccess;

  bwd_prep_kernel<Element><<<elementwise_grid(rows, 256), 256, 0, stream>>>(p);
  cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess) return e;

  // The wgmma main kernels (experiment builds only) take the buckets whose accumulators fit one warpgroup's
  // registers (Dqk + Dv <= 160); wider ones keep the sm80 kernels.
  constexpr bool kSm90Fits = kDqk + kDv <= 160;
  if (kSm90Fits && p.sm90) {
#ifdef RFSR_SM90_BWD
    if constexpr (kSm90Fits) e = sm90::run_bwd_main<Element, kDqk, kDv>(p, stream);
#else
    e = cudaErrorNotSupported;
#endif
  } else {
    const int64_t per_block = int64_t(p.H) * p.n_chunks;  // CTAs per row block
    const int64_t blocks = (p.N + Traits::kBlockOuter - 1) / Traits::kBlockOuter;
    e = launch_tiles(&bwd_dkdv_kernel<Traits>, blocks * per_block, Traits::kNThreads, Traits::kSmemBytes, p, stream);
    if (e != cudaSuccess) return e;
    e = launch_tiles(&bwd_dq_kernel<Traits>, blocks * per_block, Traits::kNThreads, Traits::kSmemBytes, p, stream);
  }
  if (e != cudaSuccess) return e;

  if (p.R > 0) {
    const int64_t total = int64_t(p.H) * p.N * p.R * (p.bias_batched ? p.B : 1);
    bwd_reduce_kernel<Element><<<elementwise_grid(total, 256), 256, 0, stream>>>(p);
    e = cudaGetLastError();
  }
  return e;
}

}  // namespace sm80
}  // namespace rfsr
