// Host-side helpers shared by the CUDA bindings of the forward and the backward (ATen side; kernels never see it).
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

#include "rfbias/params.h"  // RfbiasDtype
#include "rfbias/scale_factor.h"

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

// dst (contiguous, bias_q's shape) = bias_q * mult rounded once to their 16-bit dtype, on `stream`: the scaled query
// factor of both directions (rfbias/scale_factor.h). bias_q is (H, N, R) or (B, H, N, R) with R contiguous.
inline cudaError_t scale_factor_into(const at::Tensor& bias_q, const at::Tensor& dst, float mult, cudaStream_t stream) {
  const int o = bias_q.dim() == 4 ? 1 : 0;
  RfbiasScaleFactorParams sp{};
  sp.src = bias_q.data_ptr();
  sp.dst = dst.data_ptr();
  sp.windows = o ? bias_q.size(0) : 1;
  sp.H = static_cast<int>(bias_q.size(o));
  sp.N = static_cast<int>(bias_q.size(o + 1));
  sp.R = static_cast<int>(bias_q.size(o + 2));
  sp.batch_stride = o ? bias_q.stride(0) : 0;
  sp.head_stride = bias_q.stride(o);
  sp.row_stride = bias_q.stride(o + 1);
  sp.mult = mult;
  sp.dtype = bias_q.scalar_type() == at::kHalf ? RfbiasDtype::kFloat16 : RfbiasDtype::kBFloat16;
  return rfbias_scale_factor(sp, stream);
}

// The sizes and the strides of the inputs both directions read, in a forward or backward params struct: q, k, v as
// (B, N, H, D) and, when R > 0, the factors as (H, N, R) or (B, H, N, R) (a zero batch stride means shared by every
// window). The sizes were checked to fit an int.
template <class Params, class Shape>
void set_shape_and_input_strides(Params& p, const Shape& s, const at::Tensor& q, const at::Tensor& k,
                                 const at::Tensor& v, const at::Tensor& bias_q, const at::Tensor& bias_k) {
  p.B = static_cast<int>(s.B);
  p.N = static_cast<int>(s.N);
  p.H = static_cast<int>(s.H);
  p.D = static_cast<int>(s.D);
  p.R = static_cast<int>(s.R);
  p.q_batch_stride = q.stride(0); p.q_row_stride = q.stride(1); p.q_head_stride = q.stride(2);
  p.k_batch_stride = k.stride(0); p.k_row_stride = k.stride(1); p.k_head_stride = k.stride(2);
  p.v_batch_stride = v.stride(0); p.v_row_stride = v.stride(1); p.v_head_stride = v.stride(2);
  if (s.R > 0) {
    const int o = s.bias_batched ? 1 : 0;
    p.bq_batch_stride = s.bias_batched ? bias_q.stride(0) : 0;
    p.bq_head_stride = bias_q.stride(o);
    p.bq_row_stride = bias_q.stride(o + 1);
    p.bk_batch_stride = s.bias_batched ? bias_k.stride(0) : 0;
    p.bk_head_stride = bias_k.stride(o);
    p.bk_row_stride = bias_k.stride(o + 1);
  }
}

}  // namespace rfsr
