// Kernel-side description of one flash_rfbias backward call. Plain data only: no torch, no CuTe.
//
// Per (b, h), with logits L = scale * q.k^T + bias_q.bias_k^T, P = softmax(L) (recomputed from the forward's lse)
// and dS = P o (dO.v^T - delta), delta = rowsum(dO o out):
//   dv = P^T dO,   dq = scale * dS k,   dk = scale * dS^T q,   dbias_q = dS bias_k,   dbias_k = dS^T bias_q.
// Shared (H, N, R) factors receive the sum over b of the per-window gradients, reduced in a fixed order.
// Strides are in elements; the last dimension of every tensor has unit stride.
#pragma once

#include <cstdint>
#include <cuda_runtime.h>

#include "params.h"  // RfbiasDtype

namespace rfsr {

struct RfbiasBwdParams {
  // Inputs (all of one 16-bit dtype), (B, N, H, D) with row/head/batch strides.
  const void* q;
  const void* k;
  const void* v;
  const void* dout;
  const void* out;
  const void* bias_q;  // (H, N, R) shared, or (B, H, N, R): a zero batch stride means shared
  const void* bias_k;
  const float* lse;    // (B, H, N) contiguous, natural log

  // Outputs: (B, N, H, D) contiguous, in the input dtype.
  void* dq;
  void* dk;
  void* dv;

  // Workspace (fp32, contiguous): delta (B, H, N); per-window factor gradients (B, H, N, R).
  float* delta;
  float* dbq_part;
  float* dbk_part;
  // Final factor gradients in the input dtype, contiguous (H, N, R) or (B, H, N, R).
  void* dbq;
  void* dbk;

  int64_t q_batch_stride, q_row_stride, q_head_stride;
  int64_t k_batch_stride, k_row_stride, k_head_stride;
  int64_t v_batch_stride, v_row_stride, v_head_stride;
  int64_t do_batch_stride, do_row_stride, do_head_stride;
  int64_t o_batch_stride, o_row_stride, o_head_stride;
  int64_t bq_batch_stride, bq_head_stride, bq_row_stride;  // bq_batch_stride == 0 when shared
  int64_t bk_batch_stride, bk_head_stride, bk_row_stride;

  int B, N, H, D, R;
  bool bias_batched;

  // Scale folding, identical to the forward's (rfbias_fold_scale in params.h): the kernels stage [q * q_mult | bias_q * bq_mult] and
  // [k | bias_k], form X = Qcat . Kcat^T in fp32 and use P = exp2(X * scale_log2 - lse * log2(e)).
  // Logits are L = c * X with c = scale_log2 / log2(e), hence
  //   dq = scale * (dS Kcat)[:, :D],  dbias_q = (dS Kcat)[:, D:],  (dk | dbias_k) = c * dS^T Qcat.
  float q_mult;
  float bq_mult;
  float scale_log2;
  float scale;   // softmax scale (dq multiplier)
  float c_mult;  // scale_log2 / log2(e) (dk and dbias_k multiplier)

  // Runtime load-path choice: 16-byte loads of q, k, v, dO rows (D % 8 == 0 and 16-byte aligned rows).
  bool qkv_vec16;
  bool bias_vec2;  // factor rows 4-byte aligned and R even
};

}  // namespace rfsr
