// sm90 forward entry point: the warp-specialised wgmma kernel (fwd_ws_kernel.h), in the configuration the binding
// asks through RfbiasFwdParams::sm90_variant.
#pragma once

#include "fwd_ws_kernel.h"

namespace rfsr {
namespace sm90 {

template <typename Element, int kDqk, int kDv>
cudaError_t run_fwd(const RfbiasFwdParams& p, cudaStream_t stream) {
  return run_fwd_ws<Element, kDqk, kDv>(p, stream);
}

}  // namespace sm90
}  // namespace rfsr
