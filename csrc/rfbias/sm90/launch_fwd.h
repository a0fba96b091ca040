// sm90 forward entry point: the uniform wgmma kernel (fwd_kernel.h) or the warp-specialised one (fwd_ws_kernel.h),
// as the binding asks through RfbiasFwdParams::sm90_ws.
#pragma once

#include "fwd_kernel.h"
#include "fwd_ws_kernel.h"

namespace rfsr {
namespace sm90 {

template <typename Element, int kDqk, int kDv>
cudaError_t run_fwd(const RfbiasFwdParams& p, cudaStream_t stream) {
  return p.sm90_ws ? run_fwd_ws<Element, kDqk, kDv>(p, stream) : run_fwd_uniform<Element, kDqk, kDv>(p, stream);
}

}  // namespace sm90
}  // namespace rfsr
