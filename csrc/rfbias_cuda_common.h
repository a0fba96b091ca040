// Host-side helpers shared by the CUDA bindings of the forward and the backward (ATen side; kernels never see it).
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

#include "rfbias/params.h"  // RfbiasDtype

namespace rfsr {

// Limits of the compiled kernel buckets (Dqk = ceil16(D + R) up to 256, Dv = ceil16(D) up to 128).
constexpr int64_t kCudaMaxHeadDim = 128;
constexpr int64_t kCudaMaxRank = 128;

// The data pointer and the byte stride of every walked dimension (size > 1) but the last are multiples of `bytes`.
inline bool is_aligned(const at::Tensor& t, int64_t bytes) {
  if (reinterpret_cast<uintptr_t>(t.data_ptr()) % bytes != 0) return false;
  const int64_t es = t.element_size();
  for (int64_t d = 0; d < t.dim() - 1; ++d) {
    if (t.size(d) > 1 && (t.stride(d) * es) % bytes != 0) return false;
  }
  return true;
}

// The smallest compiled (Dqk, Dv) bucket of this dtype that holds D + R and D and runs on a device of compute
// capability `arch` (x10), or nullptr. Among kernels of one bucket the most specific arch path wins (sm90 over sm80
// on a 9.x device) unless `path_cap` (x10) is lower than its min_arch. Works for the forward and backward tables
// alike (entries carry run, dtype, dqk, dv, min_arch, max_arch).
template <typename Kernel>
const Kernel* pick_kernel(const Kernel* table, int count, RfbiasDtype dtype, int64_t D, int64_t R, int arch,
                          int path_cap = 1 << 30) {
  const Kernel* best = nullptr;
  for (int i = 0; i < count; ++i) {
    const Kernel& k = table[i];
    if (k.run == nullptr || k.dtype != dtype || k.dqk < D + R || k.dv < D || k.min_arch > arch) continue;
    if (k.max_arch != 0 && arch / 10 > k.max_arch / 10) continue;  // arch-specific code (sm_90a) runs on 9.x only
    if (k.min_arch > path_cap) continue;
    if (best == nullptr || k.dqk + k.dv < best->dqk + best->dv ||
        (k.dqk + k.dv == best->dqk + best->dv && (k.dqk < best->dqk ||
                                                  (k.dqk == best->dqk && k.min_arch > best->min_arch)))) {
      best = &k;
    }
  }
  return best;
}

}  // namespace rfsr
