// Kernel-side description of one flash_rfbias forward call. Plain data only: no torch, no CuTe.
//
// Logical problem, per (b, h):
//   out[n] = sum_m softmax_m( scale * q[n].k[m] + bias_q[n].bias_k[m] ) v[m]
// Strides are in elements. The last dimension of every tensor has unit stride.
#pragma once

#include <cmath>
#include <cstdint>
#include <cuda_runtime.h>

namespace rfsr {

enum class RfbiasDtype : int { kFloat16 = 0, kBFloat16 = 1 };

struct RfbiasFwdParams {
  // Inputs (all of one 16-bit dtype).
  const void* q;
  const void* k;
  const void* v;
  const void* bias_q;  // (H, N, R) shared, or (B, H, N, R): a zero batch stride means shared
  const void* bias_k;

  // Outputs.
  void* out;   // (B, N, H, D), written with out_*_stride
  float* lse;  // (B, H, N), contiguous

  int64_t q_batch_stride, q_row_stride, q_head_stride;
  int64_t k_batch_stride, k_row_stride, k_head_stride;
  int64_t v_batch_stride, v_row_stride, v_head_stride;
  int64_t bq_batch_stride, bq_head_stride, bq_row_stride;  // bq_batch_stride == 0 when shared
  int64_t bk_batch_stride, bk_head_stride, bk_row_stride;
  int64_t out_batch_stride, out_row_stride, out_head_stride;

  int B, N, H, D, R;

  // Folding of the softmax scale (rfbias_fold_scale below):
  //   q' = q * q_mult, bias_q' = bias_q * bq_mult (both rounded once to the input dtype in shared memory),
  //   logits = [q' | bias_q'] . [k | bias_k] * (scale_log2 / log2(e)).
  float q_mult;
  float bq_mult;
  float scale_log2;  // multiplier applied to the raw product before exp2 (always > 0)

  // Runtime load-path choices (made on the host from pointer and stride alignment).
  bool qkv_vec16;   // q, k, v rows and heads 16-byte aligned and D % 8 == 0: 16-byte cp.async, else 4-byte
  bool bias_vec2;   // factor rows 4-byte aligned and R even: 4-byte copies, else 2-byte copies
  bool bias_vec8;   // sm90 forward: also D and R multiples of 8 and factor rows 16-byte aligned: 16-byte copies

  // sm90 path only: configuration of the warp-specialised kernel (sm90/fwd_ws_kernel.h); 0 and 1 are the default,
  // others exist only in experiment builds.
  int sm90_variant;
};

// Places the softmax scale so that one packed product gives the logits:
//   scale * q.k + bq.bk = c * ( (q * q_mult) . k + (bq * bq_mult) . bk ),  c = scale_log2 / log2(e) > 0.
// Moderate positive scales (2^-10 .. 2^10) go entirely into the factor side (bq / scale: one rounding of the
// factor, no change to q). Other positive scales are split as m * 2^e with m in [0.5, 1): q is multiplied by 2^e,
// which is exact, and the factor by 1/m. Zero or negative scales multiply q (rounded once) and keep c = log2(e).
// Forward and backward must use this same function so that recomputed scores match the saved lse.
inline void rfbias_fold_scale(double scale, float& q_mult, float& bq_mult, float& scale_log2) {
  constexpr double kLog2e = 1.4426950408889634;
  if (scale >= 1.0 / 1024.0 && scale <= 1024.0) {
    q_mult = 1.f;
    bq_mult = static_cast<float>(1.0 / scale);
    scale_log2 = static_cast<float>(scale * kLog2e);
  } else if (scale > 0.0) {
    int e = 0;
    const double m = std::frexp(scale, &e);
    q_mult = static_cast<float>(std::ldexp(1.0, e));
    bq_mult = static_cast<float>(1.0 / m);
    scale_log2 = static_cast<float>(m * kLog2e);
  } else {
    q_mult = static_cast<float>(scale);
    bq_mult = 1.f;
    scale_log2 = static_cast<float>(kLog2e);
  }
}

}  // namespace rfsr
