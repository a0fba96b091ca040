// sm80 forward kernel: one CTA computes a kBlockM-row query tile of one (window, head).
//
//   S   = [q*q_mult | bias_q*bq_mult | 0] . [k | bias_k | 0]^T     one GEMM over kDqk (bias = extra K-chunk)
//   P   = exp2(S * scale_log2 - rowmax * scale_log2)               online softmax, exp2 domain
//   O  += P . v                                                    only kDv wide; P stays in registers
//   out = O / rowsum,  lse = (rowmax * scale_log2 + log2(rowsum)) * ln 2
//
// Packing happens in shared memory only: q/k/v rows land in columns [0, D), factor rows in [D, D + R), and the
// remaining columns stay zero (the tile is cleared once per CTA). Key tiles are walked from the last (the only
// partial one, masked with -inf) to the first, through a kStages-deep cp.async ring of K and V slots, so the
// loads of the next tiles overlap the math of the current one (one barrier per tile).
#pragma once

#include <cmath>
#include <cstdint>

#include "../params.h"
#include "../common/utils.h"
#include "copy.h"
#include "kernel_traits.h"

// Factor rows walked by index (copy.h): the pointer walk spills at this kernel's register cap. 0 for experiments.
#ifndef RFSR_FWD_INDEXED_FACTOR_COPY
#define RFSR_FWD_INDEXED_FACTOR_COPY 1
#endif

namespace rfsr {
namespace sm80 {

using namespace cute;

constexpr bool kIndexedFactorCopy = RFSR_FWD_INDEXED_FACTOR_COPY != 0;

template <class Traits>
__global__ void __launch_bounds__(Traits::kNThreads, Traits::kMinBlocks) rfbias_fwd_kernel(const RfbiasFwdParams p) {
  using Element = typename Traits::Element;
  constexpr int kBlockM = Traits::kBlockM;
  constexpr int kBlockN = Traits::kBlockN;
  constexpr int kDv = Traits::kDv;
  constexpr int kNThreads = Traits::kNThreads;
  constexpr int kQKStride = Traits::kQKStride;
  constexpr int kVStride = Traits::kVStride;
  constexpr int kStages = Traits::kStages;

  extern __shared__ uint4 smem_raw[];
  Element* sQ_ptr = reinterpret_cast<Element*>(smem_raw);
  Element* sK_base = sQ_ptr + Traits::kSmemQ;                // kStages slots of kSmemK
  Element* sV_base = sK_base + kStages * Traits::kSmemK;     // kStages slots of kSmemV

  const int tidx = threadIdx.x;
  const int N = p.N, D = p.D, R = p.R;

  // Heads-major flattened grid: consecutive CTAs are the m-blocks of one (window, head), then the next window
  // of the same head, so K/V tiles and the head's factors are re-read from L2.
  const int m_blocks = (N + kBlockM - 1) / kBlockM;
  const int64_t bid = blockIdx.x;
  const int m_block = int(bid % m_blocks);
  const int64_t hb = bid / m_blocks;
  const int b = int(hb % p.B);
  const int h = int(hb / p.B);
  const int m0 = m_block * kBlockM;

  const Element* q_base = static_cast<const Element*>(p.q) + b * p.q_batch_stride + h * p.q_head_stride;
  const Element* k_base = static_cast<const Element*>(p.k) + b * p.k_batch_stride + h * p.k_head_stride;
  const Element* v_base = static_cast<const Element*>(p.v) + b * p.v_batch_stride + h * p.v_head_stride;
  const Element* bq_base =
      static_cast<const Element*>(p.bias_q) + b * p.bq_batch_stride + h * p.bq_head_stride;
  const Element* bk_base =
      static_cast<const Element*>(p.bias_k) + b * p.bk_batch_stride + h * p.bk_head_stride;

  // 1. Clear the tiles once: pad columns (and rows past N) stay zero for the whole CTA.
  {
    constexpr int kElems = Traits::kSmemQ + kStages * (Traits::kSmemK + Traits::kSmemV);
    static_assert(kElems % 8 == 0, "");
    constexpr int kVec = kElems / 8;
    CUTE_UNROLL
    for (int it = 0; it < (kVec + kNThreads - 1) / kNThreads; ++it) {
      const int i = it * kNThreads + tidx;
      if (kVec % kNThreads == 0 || i < kVec) smem_raw[i] = make_uint4(0, 0, 0, 0);
    }
  }
  __syncthreads();

  // 2. Key/value pipeline: tiles are consumed last (partial) first; tile j lives in slot j % kStages.
  const int n_blocks = (N + kBlockN - 1) / kBlockN;
  using Plan16 = RowCopyPlan<Traits, kBlockN, kDv, 8>;
  using Plan4 = RowCopyPlan<Traits, kBlockN, kDv, 2>;
  const Plan16 plan16(tidx, D);
  const Plan4 plan4(tidx, D);
  const FactorCopyPlan plan_bk(tidx, kNThreads, R, p.bias_vec2);
  const bool vec16 = p.qkv_vec16;
  auto load_kv = [&](int j) {
    const int n_block = n_blocks - 1 - j;
    const int slot = j % kStages;
    const int n0 = n_block * kBlockN;
    const int valid = min(kBlockN, N - n0);
    Element* sK = sK_base + slot * Traits::kSmemK;
    Element* sV = sV_base + slot * Traits::kSmemV;
    const Element* gk = k_base + int64_t(n0) * p.k_row_stride;
    const Element* gv = v_base + int64_t(n0) * p.v_row_stride;
    if (vec16) {
      copy_tile_async<Plan16, 8, kQKStride>(plan16, sK, gk, p.k_row_stride, valid);
      copy_tile_async<Plan16, 8, kVStride>(plan16, sV, gv, p.v_row_stride, valid);
    } else {
      copy_tile_async<Plan4, 2, kQKStride>(plan4, sK, gk, p.k_row_stride, valid);
      copy_tile_async<Plan4, 2, kVStride>(plan4, sV, gv, p.v_row_stride, valid);
    }
    copy_factor_rows<kBlockN, kQKStride, false, kIndexedFactorCopy>(
        plan_bk, sK, D, bk_base + int64_t(n0) * p.bk_row_stride, p.bk_row_stride, valid, p.bias_vec2);
  };
  // 3. Query tile and its factor rows: asynchronous copies in the first group (with the first K/V tile). The
  //    scale multipliers are applied in shared memory by the copying thread once its group has landed.
  const int q_valid = min(kBlockM, N - m0);
  const Element* gq = q_base + int64_t(m0) * p.q_row_stride;
  const Element* gbq = bq_base + int64_t(m0) * p.bq_row_stride;
  using PlanQ16 = RowCopyPlan<Traits, kBlockM, kDv, 8>;
  using PlanQ4 = RowCopyPlan<Traits, kBlockM, kDv, 2>;
  const FactorCopyPlan plan_bq(tidx, kNThreads, R, p.bias_vec2);
  if (vec16) {
    copy_tile_async<PlanQ16, 8, kQKStride>(PlanQ16(tidx, D), sQ_ptr, gq, p.q_row_stride, q_valid);
  } else {
    copy_tile_async<PlanQ4, 2, kQKStride>(PlanQ4(tidx, D), sQ_ptr, gq, p.q_row_stride, q_valid);
  }
  if (R > 0) {
    if (p.bias_vec2) {
      copy_factor_rows<kBlockM, kQKStride, false, kIndexedFactorCopy>(plan_bq, sQ_ptr, D, gbq, p.bq_row_stride,
                                                                       q_valid, true);
    } else if (plan_bq.active) {  // unaligned or odd-rank factors: synchronous 2-byte copies, scaled on the way
      const float mult = p.bq_mult;
      const int c = plan_bq.unit;
      for (int r = plan_bq.row; r < q_valid; r += plan_bq.rows_per_it) {
        const uint16_t w = *reinterpret_cast<const uint16_t*>(gbq + r * p.bq_row_stride + c);
        *reinterpret_cast<uint16_t*>(sQ_ptr + r * kQKStride + D + c) = dev::Pack2<Element>::scale1(w, mult);
      }
    }
  }
  CUTE_UNROLL
  for (int j = 0; j < kStages - 1; ++j) {
    if (j < n_blocks) load_kv(j);
    dev::cp_async_commit();  // one group per stage, empty groups included, so the wait counts stay uniform
  }
  // Applies q_mult / bq_mult to the words this thread copied (called once its first group has landed).
  auto scale_own_q = [&]() {
    if (p.q_mult != 1.0f) {
      const PlanQ4 plan(tidx, D);  // word-granular walk over the query tile (each word scaled exactly once)
      if (plan.active) {
        CUTE_UNROLL
        for (int it = 0; it < PlanQ4::kIts; ++it) {
          const int r = plan.row + it * PlanQ4::kRowsPerIt;
          if (r < q_valid) {
            uint32_t* w = reinterpret_cast<uint32_t*>(sQ_ptr + r * kQKStride + plan.col);
            *w = dev::Pack2<Element>::scale(*w, p.q_mult);
          }
        }
      }
    }
    if (R > 0 && p.bias_vec2 && plan_bq.active) {
      const int c = plan_bq.unit * 2;
      for (int r = plan_bq.row; r < q_valid; r += plan_bq.rows_per_it) {
        uint32_t* w = reinterpret_cast<uint32_t*>(sQ_ptr + r * kQKStride + D + c);
        *w = dev::Pack2<Element>::scale(*w, p.bq_mult);
      }
    }
  };

  // 4. MMA partitions.
  typename Traits::TiledMma tiled_mma;
  auto thr_mma = tiled_mma.get_thread_slice(tidx);
  Tensor sQ = make_tensor(make_smem_ptr(sQ_ptr), typename Traits::SmemLayoutQ{});
  Tensor sK0 = make_tensor(make_smem_ptr(sK_base), typename Traits::SmemLayoutK{});
  Tensor sVt0 = make_tensor(make_smem_ptr(sV_base), typename Traits::SmemLayoutVt{});

  Tensor tSrQ = thr_mma.partition_fragment_A(sQ);     // (MMA, MMA_M, MMA_K)
  Tensor tSrK = thr_mma.partition_fragment_B(sK0);    // (MMA, MMA_N, MMA_K)
  Tensor tOrVt = thr_mma.partition_fragment_B(sVt0);  // (MMA, MMA_Dv, MMA_N)

  auto copy_q = make_tiled_copy_A(typename Traits::SmemCopyAtom{}, tiled_mma);
  auto copy_k = make_tiled_copy_B(typename Traits::SmemCopyAtom{}, tiled_mma);
  auto copy_v = make_tiled_copy_B(typename Traits::SmemCopyAtomTransposed{}, tiled_mma);
  Tensor tSsQ = copy_q.get_thread_slice(tidx).partition_S(sQ);

  Tensor acc_o = partition_fragment_C(tiled_mma, Shape<Int<kBlockM>, Int<kDv>>{});
  clear(acc_o);

  // Coordinates of every accumulator element (row, column) inside the tile.
  Tensor cS = make_identity_tensor(Shape<Int<kBlockM>, Int<kBlockN>>{});
  Tensor tScS = thr_mma.partition_C(cS);
  Tensor tScS_rc = make_tensor(tScS.data(), dev::rowcol_layout(tScS.layout()));

  constexpr int kRows = decltype(size<0>(dev::rowcol_layout(acc_o.layout())))::value;
  float row_max[kRows];
  float row_sum[kRows];
  CUTE_UNROLL
  for (int i = 0; i < kRows; ++i) {
    row_max[i] = -INFINITY;
    row_sum[i] = 0.f;
  }
  const float scale_log2 = p.scale_log2;

  // 5. Main loop over key tiles, last (partial) tile first. One barrier per tile: after it, tile j is visible
  //    and every thread is done with tile j - 1, whose slot receives tile j + kStages - 1.
  for (int j = 0; j < n_blocks; ++j) {
    const int n_block = n_blocks - 1 - j;
    const int slot = j % kStages;
    dev::cp_async_wait<kStages - 2>();
    if (j == 0 && (p.q_mult != 1.0f || (R > 0 && p.bias_vec2 && p.bq_mult != 1.0f))) {
      // The query tile has landed (group 0). With 16-byte copies a thread's words are not the ones it
      // copied, so publish the copies first; the factor words are always this thread's own.
      if (vec16) __syncthreads();
      scale_own_q();
    }
    __syncthreads();
    if (j + kStages - 1 < n_blocks) load_kv(j + kStages - 1);
    dev::cp_async_commit();

    Tensor sK = make_tensor(make_smem_ptr(sK_base + slot * Traits::kSmemK), typename Traits::SmemLayoutK{});
    Tensor sVt = make_tensor(make_smem_ptr(sV_base + slot * Traits::kSmemV), typename Traits::SmemLayoutVt{});
    Tensor tSsK = copy_k.get_thread_slice(tidx).partition_S(sK);
    Tensor tOsVt = copy_v.get_thread_slice(tidx).partition_S(sVt);

    Tensor acc_s = partition_fragment_C(tiled_mma, Shape<Int<kBlockM>, Int<kBlockN>>{});
    clear(acc_s);
    dev::gemm_ss(tiled_mma, acc_s, tSrQ, tSrK, tSsQ, tSsK, copy_q, copy_k, tidx);

    Tensor S = make_tensor(acc_s.data(), dev::rowcol_layout(acc_s.layout()));
    if ((n_block + 1) * kBlockN > N) {
      const int limit = N - n_block * kBlockN;
      CUTE_UNROLL
      for (int mi = 0; mi < size<0>(S); ++mi) {
        CUTE_UNROLL
        for (int ni = 0; ni < size<1>(S); ++ni) {
          if (int(get<1>(tScS_rc(mi, ni))) >= limit) S(mi, ni) = -INFINITY;
        }
      }
    }

    // Online softmax (exp2 domain). Each row lives in one quad of lanes. The O / row-sum rescale is skipped
    // when no row maximum of the warp grew (the common case after the first tiles).
    Tensor O = make_tensor(acc_o.data(), dev::rowcol_layout(acc_o.layout()));
    float m_new[kRows];
    bool grew = false;
    CUTE_UNROLL
    for (int mi = 0; mi < size<0>(S); ++mi) {
      const float mx = dev::quad_max(dev::row_max(S, mi));
      m_new[mi] = fmaxf(row_max[mi], mx);
      grew |= m_new[mi] > row_max[mi];
    }
    if (__any_sync(0xffffffffu, grew)) {
      CUTE_UNROLL
      for (int mi = 0; mi < size<0>(S); ++mi) {
        const float corr = exp2f((row_max[mi] - m_new[mi]) * scale_log2);
        row_sum[mi] *= corr;
        CUTE_UNROLL
        for (int di = 0; di < size<1>(O); ++di) O(mi, di) *= corr;
      }
    }
    CUTE_UNROLL
    for (int mi = 0; mi < size<0>(S); ++mi) {
      row_max[mi] = m_new[mi];
      row_sum[mi] += dev::row_exp2_sum(S, mi, scale_log2, m_new[mi] * scale_log2);
    }

    Tensor rP = dev::convert_fragment<Element>(acc_s);
    Tensor tOrP = make_tensor(rP.data(), dev::acc_as_a_layout(rP.layout()));
    dev::gemm_rs(tiled_mma, acc_o, tOrP, tOrVt, tOsVt, copy_v, tidx);
  }

  // 6. Epilogue: normalise, write out (4-byte stores: D is even) and lse.
  Tensor O = make_tensor(acc_o.data(), dev::rowcol_layout(acc_o.layout()));
  Tensor cO = make_identity_tensor(Shape<Int<kBlockM>, Int<kDv>>{});
  Tensor tOcO = thr_mma.partition_C(cO);
  Tensor tOcO_rc = make_tensor(tOcO.data(), dev::rowcol_layout(tOcO.layout()));
  dev::store_out_lse(O, tOcO_rc, row_max, row_sum, m0, N, D,
                     static_cast<Element*>(p.out) + b * p.out_batch_stride + h * p.out_head_stride, p.out_row_stride,
                     p.lse + (int64_t(b) * p.H + h) * N, scale_log2);
}

}  // namespace sm80
}  // namespace rfsr
