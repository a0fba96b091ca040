// Host-side launch of the sm80 forward kernel for one (dtype, kDqk, kDv) bucket.
#pragma once

#include "../params.h"
#include "fwd_kernel.h"

namespace rfsr {
namespace sm80 {

template <class Traits>
cudaError_t launch_fwd(const RfbiasFwdParams& p, cudaStream_t stream) {
  const int64_t m_blocks = (p.N + Traits::kBlockM - 1) / Traits::kBlockM;
  const int64_t grid = m_blocks * p.B * p.H;
  if (grid <= 0) return cudaSuccess;
  if (grid > 0x7fffffffLL) return cudaErrorInvalidConfiguration;
  auto kernel = &rfbias_fwd_kernel<Traits>;
  constexpr int kSmem = Traits::kSmemBytes;
  if (kSmem > 48 * 1024) {
    cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmem);
    if (e != cudaSuccess) return e;
  }
  kernel<<<dim3(unsigned(grid)), dim3(Traits::kNThreads), kSmem, stream>>>(p);
  return cudaGetLastError();
}

template <typename Element, int kDqk, int kDv>
cudaError_t run_fwd(const RfbiasFwdParams& p, cudaStream_t stream) {
  return launch_fwd<typename FwdConfigSm80<Element, kDqk, kDv>::Traits>(p, stream);
}

}  // namespace sm80
}  // namespace rfsr
