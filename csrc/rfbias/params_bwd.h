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

  // Workspace, contiguous. delta and lse2 = lse * log2(e): fp32 (B, H, N), written by the first launch.
  // bq_scaled = bias_q * bq_mult rounded once to the input dtype, exactly the forward's staged factor:
  // (H, N, R), or (B, H, N, R) for per-window factors. Factor-gradient partials: fp32 (P, H, N, R) with P = B for
  // per-window factors and P = n_chunks for shared ones (see rfbias_bwd_chunking).
  float* delta;
  float* lse2;
  void* bq_scaled;
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
  int chunk_windows;  // windows walked by one CTA of the main kernels (rfbias_bwd_chunking)
  int n_chunks;

  // Scale folding, identical to the forward's (rfbias_fold_scale in params.h): with Qs = [q * q_mult | bq_scaled]
  // and Kc = [k | bias_k], X = Qs . Kc^T in fp32, P = exp2(X * scale_log2 - lse2), and the logits are L = c * X
  // with c = scale_log2 / log2(e) (c * q_mult == scale, c * bq_mult == 1). Hence
  //   dq = scale * dS k,  dbias_q = dS bias_k,  dk = scale * dS^T q,  dbias_k = c * dS^T bq_scaled.
  float q_mult;
  float bq_mult;
  float scale_log2;
  float scale;   // softmax scale (dq multiplier)
  float c_mult;  // scale_log2 / log2(e) (dbias_k multiplier)

  // Runtime load-path choice: 16-byte loads of q, k, v, dO rows (D % 8 == 0 and 16-byte aligned rows).
  bool qkv_vec16;
  bool bias_vec2;  // bias_k rows 4-byte aligned and R even
  bool bqs_vec2;   // R even (bq_scaled is contiguous)

  // The dK/dV and dQ kernels on the wgmma path (sm90/bwd_kernel.h; builds with -DRFSR_SM90_BWD, 9.x devices).
  bool sm90;
};

// Rows owned by one CTA of the main backward kernels (keys in the dK/dV kernel, queries in the dQ kernel).
constexpr int kRfbiasBwdBlock = 64;

// Each CTA of the main kernels walks `chunk_windows` consecutive windows of one (row block, head), so the shared
// factors' gradient is summed over those windows in registers and only n_chunks partial rows per factor row reach
// memory (then a fixed-order sum). The split depends on the shapes alone, so results are the same on every run:
// enough chunks for about 4096 CTAs, no more than B.
inline void rfbias_bwd_chunking(int64_t B, int64_t H, int64_t N, int& chunk_windows, int& n_chunks) {
  if (B <= 0 || H <= 0 || N <= 0) {
    chunk_windows = 1;
    n_chunks = 0;
    return;
  }
  const int64_t ctas_per_chunk = (N + kRfbiasBwdBlock - 1) / kRfbiasBwdBlock * H;
  int64_t want = (4096 + ctas_per_chunk - 1) / ctas_per_chunk;
  want = want < 1 ? 1 : (want > B ? B : want);
  const int64_t per = (B + want - 1) / want;
  chunk_windows = static_cast<int>(per);
  n_chunks = static_cast<int>((B + per - 1) / per);
}

}  // namespace rfsr
