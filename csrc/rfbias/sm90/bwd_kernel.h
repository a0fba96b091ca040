// sm90a backward kernels (wgmma): the dK/dV and dQ kernels of sm80/bwd_kernel.h with their GEMMs on the
// warpgroup MMA. Status: compiled only with -DRFSR_SM90_BWD (RFSR_NVCC_FLAGS), selected by RFSR_BWD_PATH=sm90 on 9.x
// devices (buckets with Dqk + Dv <= 160; wider ones spill here and keep the sm80 kernels). Measured on an H200
// (benchmarks/results/fwd-ws-h200-2026-11-27.md, section 5): correct, 2-3 % faster than sm80 at 64x64 and 96x96
// windows and slower at smaller ones, so it stays out of the default build.
//
// The walk, the workspace and the deterministic factor-gradient reduction are the sm80 kernels' (a CTA owns 64 rows
// of one head and walks `chunk_windows` windows; the other side streams through a kStages-deep cp.async ring, last
// partial tile first; per-chunk partials of the shared factors' gradient, summed later in a fixed order). What
// changes: one warpgroup per CTA, shared-memory tiles in the swizzled layouts wgmma reads (sm90/tiles.h's copy
// plans), and each step's products as wgmma:
//   dK/dV kernel (64 keys):   S^T = Kc . Qs^T, dP^T = V . dO^T        both operands in shared memory
//                             dV += P^T . dO,  [dK | dbias_k] += dS^T . Qs   P^T, dS^T from registers, dO and Qs
//                                                                     read transposed (MN-major) from the same tiles
//   dQ kernel (64 queries):   S = Qs . Kc^T, dP = dO . V^T;  [dQ | dbias_q] += dS . Kc
// Masks: the partial tile's rows past N may hold an earlier window's rows (the ring is not cleared between windows),
// so both kernels mask that tile's columns, as the sm80 dQ kernel does.
#pragma once

#include "tiles.h"
#include "../sm80/bwd_kernel.h"

namespace rfsr {
namespace sm90 {

template <typename Element_, int kDqk_, int kDv_>
struct BwdTraitsSm90 {
  using Element = Element_;
  static constexpr int kDqk = kDqk_;
  static constexpr int kDv = kDv_;
  static constexpr int kNThreads = 128;  // one warpgroup
  static constexpr int kBlockOuter = 64;
  static_assert(kBlockOuter == kRfbiasBwdBlock, "the host-side chunking assumes this block");
  static constexpr int kBlockInner = 64;
  static constexpr bool kWide = kDqk + kDv > 192;
  static constexpr int kStages = kWide ? 2 : 3;
  static constexpr int kMinBlocks = kWide ? 1 : 2;
  static_assert(kDqk % 16 == 0 && kDv % 16 == 0, "wgmma tile constraints");

  // 64 x 64 score tiles from shared-memory operands; K-dims Dqk (S) and Dv (dP).
  using MmaS = decltype(cute::make_tiled_mma(
      cute::GMMA::ss_op_selector<Element, Element, float, cute::Shape<cute::_64, cute::_64, cute::Int<kDqk>>>()));
  using MmaP = decltype(cute::make_tiled_mma(
      cute::GMMA::ss_op_selector<Element, Element, float, cute::Shape<cute::_64, cute::_64, cute::Int<kDv>>>()));
  // Gradient products: A (P or dS) from registers, B read transposed from a row tile (MN-major).
  using MmaGv = decltype(cute::make_tiled_mma(
      cute::GMMA::rs_op_selector<Element, Element, float, cute::Shape<cute::_64, cute::Int<kDv>, cute::_64>,
                                 cute::GMMA::Major::K, cute::GMMA::Major::MN>()));
  using MmaGqk = decltype(cute::make_tiled_mma(
      cute::GMMA::rs_op_selector<Element, Element, float, cute::Shape<cute::_64, cute::Int<kDqk>, cute::_64>,
                                 cute::GMMA::Major::K, cute::GMMA::Major::MN>()));

  // 64-row tiles, K-major (rows x columns, columns contiguous), and their transposed (columns x rows) views.
  using RowsQK = decltype(cute::tile_to_shape(
      cutlass::gemm::collective::detail::ss_smem_selector<cute::GMMA::Major::K, Element, cute::_64, cute::Int<kDqk>>(),
      cute::Shape<cute::_64, cute::Int<kDqk>>{}));
  using RowsV = decltype(cute::tile_to_shape(
      cutlass::gemm::collective::detail::ss_smem_selector<cute::GMMA::Major::K, Element, cute::_64, cute::Int<kDv>>(),
      cute::Shape<cute::_64, cute::Int<kDv>>{}));
  using RowsQKt = decltype(cute::composition(
      RowsQK{}, cute::make_layout(cute::Shape<cute::Int<kDqk>, cute::_64>{}, cute::Stride<cute::_64, cute::_1>{})));
  using RowsVt = decltype(cute::composition(
      RowsV{}, cute::make_layout(cute::Shape<cute::Int<kDv>, cute::_64>{}, cute::Stride<cute::_64, cute::_1>{})));

  static constexpr int align1k(int bytes) { return (bytes + 1023) / 1024 * 1024; }
  static constexpr int kBytesQK = align1k(64 * kDqk * int(sizeof(Element)));
  static constexpr int kBytesV = align1k(64 * kDv * int(sizeof(Element)));
  // A slot: the QK-width tile, the V-width tile, then lse2 and delta of its 64 rows (fp32).
  static constexpr int kSlotBytes = align1k(kBytesQK + kBytesV + 2 * 64 * int(sizeof(float)));
  static constexpr int kSmemBytes = (2 + kStages) * kSlotBytes + 1024;  // two stationary slots, the ring, slack
};

template <class Traits>
struct SlotSm90 {
  using Element = typename Traits::Element;
  Element* qk;
  Element* v;
  float* lse2;
  float* delta;
  __device__ __forceinline__ explicit SlotSm90(uint8_t* base) {
    qk = reinterpret_cast<Element*>(base);
    v = reinterpret_cast<Element*>(base + Traits::kBytesQK);
    lse2 = reinterpret_cast<float*>(base + Traits::kBytesQK + Traits::kBytesV);
    delta = lse2 + 64;
  }
};

// Multiplies columns [0, D) of the 64 rows of a swizzled stationary tile by q_mult in place (rounded once, as the
// forward does), then hands the writes to wgmma (async-proxy fence and a CTA barrier: every warp reads every row).
template <class Traits, class STensor>
__device__ __forceinline__ void scale_tile_rows(STensor& s, int D, float q_mult, int tidx) {
  using Element = typename Traits::Element;
  const int words = D / 2;
  for (int i = tidx; i < 64 * words; i += Traits::kNThreads) {
    const int r = i / words, c = (i - r * words) * 2;
    uint32_t* w = reinterpret_cast<uint32_t*>(&s(r, c));
    *w = dev::Pack2<Element>::scale(*w, q_mult);
  }
  cutlass::arch::fence_view_async_shared();
  __syncthreads();
}

// One wgmma batch: acc (=|+=) A . B over the K blocks, committed; the caller waits (warpgroup_wait) and fences.
template <bool kZeroInit, class Mma, class Acc, class FA, class FB>
__device__ __forceinline__ void wgmma_issue(Mma& mma, Acc& acc, FA const& a, FB const& b) {
  using namespace cute;
  warpgroup_fence_operand(acc);
  warpgroup_arrive();
  if constexpr (kZeroInit) mma.accumulate_ = GMMA::ScaleOut::Zero;
  CUTE_UNROLL
  for (int kb = 0; kb < size<2>(a); ++kb) {
    cute::gemm(mma, a(_, _, kb), b(_, _, kb), acc);
    mma.accumulate_ = GMMA::ScaleOut::One;
  }
  warpgroup_commit_batch();
}

// Register A operand (16-bit) of a 64 x 64 fp32 score accumulator.
template <typename Element, class Acc>
__device__ __forceinline__ auto scores_as_a(Acc const& acc) {
  using namespace cute;
  constexpr int kN = decltype(size(acc))::value;
  Tensor r = make_tensor<Element>(acc.layout());
  cutlass::NumericArrayConverter<Element, float, kN> conv;
  *reinterpret_cast<cutlass::Array<Element, kN>*>(r.data()) =
      conv(*reinterpret_cast<const cutlass::Array<float, kN>*>(acc.data()));
  return r;
}

// ---------------------------------------------------------------------------------------------------------------
// dK, dV, dbias_k: key-stationary.

template <class Traits, bool kVec16>
__global__ void __launch_bounds__(Traits::kNThreads, Traits::kMinBlocks) bwd_dkdv_kernel(const RfbiasBwdParams p) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using namespace cute;
  using Element = typename Traits::Element;
  using sm80::BwdCta;
  using sm80::BwdStep;
  constexpr int kStages = Traits::kStages;
  constexpr int kBlockM = Traits::kBlockInner;  // queries per step
  constexpr int kBlockN = Traits::kBlockOuter;  // keys owned by the CTA
  constexpr int kVec = kVec16 ? 8 : 2;

  extern __shared__ uint8_t smem_dyn[];
  uint8_t* smem = reinterpret_cast<uint8_t*>((reinterpret_cast<uintptr_t>(smem_dyn) + 1023) & ~uintptr_t(1023));
  auto outer_at = [&](int i) { return SlotSm90<Traits>(smem + i * Traits::kSlotBytes); };
  auto inner_at = [&](int i) { return SlotSm90<Traits>(smem + (2 + i) * Traits::kSlotBytes); };

  const int tidx = threadIdx.x;
  const int N = p.N, D = p.D, R = p.R, H = p.H;
  const int n_blocks = (N + kBlockN - 1) / kBlockN;
  const int m_blocks = (N + kBlockM - 1) / kBlockM;
  const BwdCta cta(p, n_blocks);
  const int h = cta.h;
  const int n0 = cta.block * kBlockN;
  const int n_valid = min(kBlockN, N - n0);
  const int steps = (cta.b_end - cta.b_begin) * m_blocks;
  const int dist = sm80::prefetch_distance<kStages>(m_blocks);

  sm80::clear_smem<(2 + kStages) * Traits::kSlotBytes, Traits::kNThreads>(reinterpret_cast<uint4*>(smem), tidx);
  __syncthreads();

  // Copy plans (offsets into the swizzled tiles, built once; slot 0 stands for every slot).
  Tensor sQK0 = make_tensor(make_smem_ptr(outer_at(0).qk), typename Traits::RowsQK{});
  Tensor sV0 = make_tensor(make_smem_ptr(outer_at(0).v), typename Traits::RowsV{});
  const Element* k_head = static_cast<const Element*>(p.k) + h * p.k_head_stride;
  const Element* v_head = static_cast<const Element*>(p.v) + h * p.v_head_stride;
  const Element* q_head = static_cast<const Element*>(p.q) + h * p.q_head_stride;
  const Element* do_head = static_cast<const Element*>(p.dout) + h * p.do_head_stride;
  // Copy plans, built once: per-thread source pointers in the head's first window (a window is a shift) and
  // swizzled destination offsets (slot 0 stands for every slot).
  using RowPlan = SwizzledRowPlan<Traits::kNThreads, 64, Traits::kDv, kVec, Element>;
  const RowPlan plan_k(tidx, sQK0, k_head, p.k_row_stride, D);
  const RowPlan plan_v(tidx, sV0, v_head, p.v_row_stride, D);
  const RowPlan plan_q(tidx, sQK0, q_head, p.q_row_stride, D);
  const RowPlan plan_do(tidx, sV0, do_head, p.do_row_stride, D);
  const SwizzledFactorPlan<Traits::kNThreads> plan_bk(tidx, D, R, p.bias_vec2, sQK0);
  const SwizzledFactorPlan<Traits::kNThreads> plan_bq(tidx, D, R, p.bqs_vec2, sQK0);
  const Element* bqs_head = static_cast<const Element*>(p.bq_scaled) + int64_t(h) * N * R;
  const int64_t bqs_batch = p.bias_batched ? int64_t(H) * N * R : 0;

  auto load_step = [&](const BwdStep& st) {
    const int b = cta.b_begin + st.w;
    if (st.j == 0) {  // the window's stationary tile: [k | bias_k] and v rows of this key block
      SlotSm90<Traits> o = outer_at(st.w & 1);
      plan_k.copy(o.qk, n0, n_valid, b * p.k_batch_stride);
      plan_v.copy(o.v, n0, n_valid, b * p.v_batch_stride);
      if (R > 0) {
        const Element* gbk = static_cast<const Element*>(p.bias_k) + b * p.bk_batch_stride + h * p.bk_head_stride +
                             int64_t(n0) * p.bk_row_stride;
        plan_bk.copy(o.qk, gbk, p.bk_row_stride, n_valid, p.bias_vec2, 1.0f);
      }
    }
    const int m0 = (m_blocks - 1 - st.j) * kBlockM;
    const int valid = min(kBlockM, N - m0);
    SlotSm90<Traits> in = inner_at(st.slot);
    plan_q.copy(in.qk, m0, valid, b * p.q_batch_stride);
    plan_do.copy(in.v, m0, valid, b * p.do_batch_stride);
    if (R > 0) plan_bq.copy(in.qk, bqs_head + b * bqs_batch + int64_t(m0) * R, R, valid, p.bqs_vec2, 1.0f);
    const int64_t stat0 = (int64_t(b) * H + h) * N + m0;
    sm80::copy_stats<64, Traits::kNThreads>(in.lse2, in.delta, p.lse2 + stat0, p.delta + stat0, valid, tidx);
  };

  typename Traits::MmaS mma_s;
  typename Traits::MmaP mma_p;
  typename Traits::MmaGv mma_gv;
  typename Traits::MmaGqk mma_gqk;
  auto thr_s = mma_s.get_thread_slice(tidx);
  auto thr_p = mma_p.get_thread_slice(tidx);
  auto thr_gv = mma_gv.get_thread_slice(tidx);
  auto thr_gqk = mma_gqk.get_thread_slice(tidx);

  Tensor acc_dv = partition_fragment_C(mma_gv, Shape<_64, Int<Traits::kDv>>{});
  Tensor acc_dk = partition_fragment_C(mma_gqk, Shape<_64, Int<Traits::kDqk>>{});
  clear(acc_dv);
  clear(acc_dk);
  Tensor dV = make_tensor(acc_dv.data(), rowcol_layout(acc_dv.layout()));
  Tensor dK = make_tensor(acc_dk.data(), rowcol_layout(acc_dk.layout()));
  Tensor cdv = thr_gv.partition_C(make_identity_tensor(Shape<_64, Int<Traits::kDv>>{}));
  Tensor cdk = thr_gqk.partition_C(make_identity_tensor(Shape<_64, Int<Traits::kDqk>>{}));
  Tensor cdv_rc = make_tensor(cdv.data(), rowcol_layout(cdv.layout()));
  Tensor cdk_rc = make_tensor(cdk.data(), rowcol_layout(cdk.layout()));
  Tensor cS = thr_s.partition_C(make_identity_tensor(Shape<_64, _64>{}));
  Tensor cS_rc = make_tensor(cS.data(), rowcol_layout(cS.layout()));
  constexpr int kCols = decltype(size<1>(cS_rc))::value;

  const float scale_log2 = p.scale_log2;
  const int64_t out_row_stride = int64_t(H) * D;
  const int partial_limit = N - (m_blocks - 1) * kBlockM;  // valid queries of the first (last-index) tile

  BwdStep ld;  // the step being loaded: always `dist` steps ahead of `cur`
  for (int i = 0; i < dist; ++i) {
    if (ld.s < steps) load_step(ld);
    dev::cp_async_commit();
    ld.advance<kStages>(m_blocks);
  }

  for (BwdStep cur; cur.s < steps; cur.advance<kStages>(m_blocks)) {
    const int j = cur.j;
    const int b = cta.b_begin + cur.w;
    sm80::wait_ring<kStages>(dist);
    cutlass::arch::fence_view_async_shared();
    __syncthreads();  // step s has landed for everybody; everybody is done with step s - 1
    if (ld.s < steps) load_step(ld);
    dev::cp_async_commit();
    ld.advance<kStages>(m_blocks);

    SlotSm90<Traits> o = outer_at(cur.w & 1);
    Tensor sK = make_tensor(make_smem_ptr(o.qk), typename Traits::RowsQK{});
    Tensor sV = make_tensor(make_smem_ptr(o.v), typename Traits::RowsV{});
    if (j == 0 && p.q_mult != 1.0f) scale_tile_rows<Traits>(sK, D, p.q_mult, tidx);  // q_mult on K: see sm80
    SlotSm90<Traits> in = inner_at(cur.slot);
    Tensor sQ = make_tensor(make_smem_ptr(in.qk), typename Traits::RowsQK{});
    Tensor sQt = make_tensor(make_smem_ptr(in.qk), typename Traits::RowsQKt{});
    Tensor sdO = make_tensor(make_smem_ptr(in.v), typename Traits::RowsV{});
    Tensor sdOt = make_tensor(make_smem_ptr(in.v), typename Traits::RowsVt{});

    // S^T and dP^T queued back to back; P^T is formed while dP^T runs.
    Tensor acc_s = partition_fragment_C(mma_s, Shape<_64, _64>{});
    Tensor acc_dp = partition_fragment_C(mma_p, Shape<_64, _64>{});
    wgmma_issue<true>(mma_s, acc_s, thr_s.make_fragment_A(thr_s.partition_A(sK)),
                      thr_s.make_fragment_B(thr_s.partition_B(sQ)));
    wgmma_issue<true>(mma_p, acc_dp, thr_p.make_fragment_A(thr_p.partition_A(sV)),
                      thr_p.make_fragment_B(thr_p.partition_B(sdO)));

    Tensor S = make_tensor(acc_s.data(), rowcol_layout(acc_s.layout()));
    Tensor dP = make_tensor(acc_dp.data(), rowcol_layout(acc_dp.layout()));
    float col_lse2[kCols], col_delta[kCols];
    CUTE_UNROLL
    for (int ni = 0; ni < kCols; ++ni) {
      const int col = int(get<1>(cS_rc(0, ni)));
      col_lse2[ni] = in.lse2[col];
      col_delta[ni] = in.delta[col];
    }
    const bool masked = j == 0 && partial_limit < kBlockM;
    warpgroup_wait<1>();
    warpgroup_fence_operand(acc_s);
    CUTE_UNROLL
    for (int mi = 0; mi < size<0>(S); ++mi) {
      CUTE_UNROLL
      for (int ni = 0; ni < kCols; ++ni) {
        const float pv = exp2f(S(mi, ni) * scale_log2 - col_lse2[ni]);
        S(mi, ni) = masked && int(get<1>(cS_rc(mi, ni))) >= partial_limit ? 0.f : pv;
      }
    }
    warpgroup_fence_operand(acc_s);
    warpgroup_wait<0>();
    warpgroup_fence_operand(acc_dp);
    CUTE_UNROLL
    for (int mi = 0; mi < size<0>(S); ++mi) {
      CUTE_UNROLL
      for (int ni = 0; ni < kCols; ++ni) dP(mi, ni) = S(mi, ni) * (dP(mi, ni) - col_delta[ni]);
    }
    // dV and dK queued back to back, both retired before the next step's barrier (the ring slot they read is
    // refilled after it).
    Tensor rP = scores_as_a<Element>(acc_s);
    Tensor rdS = scores_as_a<Element>(acc_dp);
    wgmma_issue<false>(mma_gv, acc_dv, make_tensor(rP.data(), acc_as_a_layout(rP.layout())),
                       thr_gv.make_fragment_B(thr_gv.partition_B(sdOt)));
    wgmma_issue<false>(mma_gqk, acc_dk, make_tensor(rdS.data(), acc_as_a_layout(rdS.layout())),
                       thr_gqk.make_fragment_B(thr_gqk.partition_B(sQt)));
    warpgroup_wait<0>();
    warpgroup_fence_operand(acc_dv);
    warpgroup_fence_operand(acc_dk);

    if (j == m_blocks - 1) {  // window done: dv, dk (and per-window dbias_k) out, those columns cleared
      Element* dv_base = static_cast<Element*>(p.dv) + (int64_t(b) * N * H + h) * D;
      Element* dk_base = static_cast<Element*>(p.dk) + (int64_t(b) * N * H + h) * D;
      sm80::store_rows(dV, cdv_rc, dv_base, out_row_stride, n0, N, D, 1.0f);
      sm80::store_rows(dK, cdk_rc, dk_base, out_row_stride, n0, N, D, p.scale);
      clear(acc_dv);
      sm80::clear_columns(dK, cdk_rc, D, false);
      if (p.bias_batched && R > 0) {
        sm80::store_factor_rows(dK, cdk_rc, p.dbk_part + (int64_t(b) * H + h) * N * R, n0, N, D, R, p.c_mult);
        sm80::clear_columns(dK, cdk_rc, D, true);
      }
    }
  }
  if (!p.bias_batched && R > 0 && steps > 0) {
    const int chunk = cta.b_begin / p.chunk_windows;
    sm80::store_factor_rows(dK, cdk_rc, p.dbk_part + (int64_t(chunk) * H + h) * N * R, n0, N, D, R, p.c_mult);
  }
#else
  __trap();  // compiled for another architecture: never launched there (the binding checks the device)
#endif
}

// ---------------------------------------------------------------------------------------------------------------
// dQ and dbias_q: query-stationary.

template <class Traits, bool kVec16>
__global__ void __launch_bounds__(Traits::kNThreads, Traits::kMinBlocks) bwd_dq_kernel(const RfbiasBwdParams p) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using namespace cute;
  using Element = typename Traits::Element;
  using sm80::BwdCta;
  using sm80::BwdStep;
  constexpr int kStages = Traits::kStages;
  constexpr int kBlockM = Traits::kBlockOuter;  // queries owned by the CTA
  constexpr int kBlockN = Traits::kBlockInner;  // keys per step
  constexpr int kVec = kVec16 ? 8 : 2;

  extern __shared__ uint8_t smem_dyn[];
  uint8_t* smem = reinterpret_cast<uint8_t*>((reinterpret_cast<uintptr_t>(smem_dyn) + 1023) & ~uintptr_t(1023));
  auto outer_at = [&](int i) { return SlotSm90<Traits>(smem + i * Traits::kSlotBytes); };
  auto inner_at = [&](int i) { return SlotSm90<Traits>(smem + (2 + i) * Traits::kSlotBytes); };

  const int tidx = threadIdx.x;
  const int N = p.N, D = p.D, R = p.R, H = p.H;
  const int m_blocks = (N + kBlockM - 1) / kBlockM;
  const int n_blocks = (N + kBlockN - 1) / kBlockN;
  const BwdCta cta(p, m_blocks);
  const int h = cta.h;
  const int m0 = cta.block * kBlockM;
  const int m_valid = min(kBlockM, N - m0);
  const int steps = (cta.b_end - cta.b_begin) * n_blocks;
  const int dist = sm80::prefetch_distance<kStages>(n_blocks);

  sm80::clear_smem<(2 + kStages) * Traits::kSlotBytes, Traits::kNThreads>(reinterpret_cast<uint4*>(smem), tidx);
  __syncthreads();

  Tensor sQK0 = make_tensor(make_smem_ptr(outer_at(0).qk), typename Traits::RowsQK{});
  Tensor sV0 = make_tensor(make_smem_ptr(outer_at(0).v), typename Traits::RowsV{});
  const Element* k_head = static_cast<const Element*>(p.k) + h * p.k_head_stride;
  const Element* v_head = static_cast<const Element*>(p.v) + h * p.v_head_stride;
  const Element* q_head = static_cast<const Element*>(p.q) + h * p.q_head_stride;
  const Element* do_head = static_cast<const Element*>(p.dout) + h * p.do_head_stride;
  using RowPlan = SwizzledRowPlan<Traits::kNThreads, 64, Traits::kDv, kVec, Element>;
  const RowPlan plan_k(tidx, sQK0, k_head, p.k_row_stride, D);
  const RowPlan plan_v(tidx, sV0, v_head, p.v_row_stride, D);
  const RowPlan plan_q(tidx, sQK0, q_head, p.q_row_stride, D);
  const RowPlan plan_do(tidx, sV0, do_head, p.do_row_stride, D);
  const SwizzledFactorPlan<Traits::kNThreads> plan_bk(tidx, D, R, p.bias_vec2, sQK0);
  const SwizzledFactorPlan<Traits::kNThreads> plan_bq(tidx, D, R, p.bqs_vec2, sQK0);
  const Element* bqs_head = static_cast<const Element*>(p.bq_scaled) + int64_t(h) * N * R;
  const int64_t bqs_batch = p.bias_batched ? int64_t(H) * N * R : 0;

  auto load_step = [&](const BwdStep& st) {
    const int b = cta.b_begin + st.w;
    if (st.j == 0) {  // the window's stationary tile: [q | bq_scaled], dO rows and their statistics
      SlotSm90<Traits> o = outer_at(st.w & 1);
      plan_q.copy(o.qk, m0, m_valid, b * p.q_batch_stride);
      plan_do.copy(o.v, m0, m_valid, b * p.do_batch_stride);
      if (R > 0) plan_bq.copy(o.qk, bqs_head + b * bqs_batch + int64_t(m0) * R, R, m_valid, p.bqs_vec2, 1.0f);
      const int64_t stat0 = (int64_t(b) * H + h) * N + m0;
      sm80::copy_stats<64, Traits::kNThreads>(o.lse2, o.delta, p.lse2 + stat0, p.delta + stat0, m_valid, tidx);
    }
    const int n0 = (n_blocks - 1 - st.j) * kBlockN;
    const int valid = min(kBlockN, N - n0);
    SlotSm90<Traits> in = inner_at(st.slot);
    plan_k.copy(in.qk, n0, valid, b * p.k_batch_stride);
    plan_v.copy(in.v, n0, valid, b * p.v_batch_stride);
    if (R > 0) {
      const Element* gbk = static_cast<const Element*>(p.bias_k) + b * p.bk_batch_stride + h * p.bk_head_stride +
                           int64_t(n0) * p.bk_row_stride;
      plan_bk.copy(in.qk, gbk, p.bk_row_stride, valid, p.bias_vec2, 1.0f);
    }
  };

  typename Traits::MmaS mma_s;
  typename Traits::MmaP mma_p;
  typename Traits::MmaGqk mma_gqk;
  auto thr_s = mma_s.get_thread_slice(tidx);
  auto thr_p = mma_p.get_thread_slice(tidx);
  auto thr_gqk = mma_gqk.get_thread_slice(tidx);

  Tensor acc_dq = partition_fragment_C(mma_gqk, Shape<_64, Int<Traits::kDqk>>{});
  clear(acc_dq);
  Tensor dQ = make_tensor(acc_dq.data(), rowcol_layout(acc_dq.layout()));
  Tensor cdq = thr_gqk.partition_C(make_identity_tensor(Shape<_64, Int<Traits::kDqk>>{}));
  Tensor cdq_rc = make_tensor(cdq.data(), rowcol_layout(cdq.layout()));
  Tensor cS = thr_s.partition_C(make_identity_tensor(Shape<_64, _64>{}));
  Tensor cS_rc = make_tensor(cS.data(), rowcol_layout(cS.layout()));
  constexpr int kRows = decltype(size<0>(cS_rc))::value;
  float row_lse2[kRows], row_delta[kRows];

  const float scale_log2 = p.scale_log2;
  const int64_t out_row_stride = int64_t(H) * D;
  const int partial_limit = N - (n_blocks - 1) * kBlockN;  // valid keys of the first (last-index) tile

  BwdStep ld;
  for (int i = 0; i < dist; ++i) {
    if (ld.s < steps) load_step(ld);
    dev::cp_async_commit();
    ld.advance<kStages>(n_blocks);
  }

  for (BwdStep cur; cur.s < steps; cur.advance<kStages>(n_blocks)) {
    const int j = cur.j;
    const int b = cta.b_begin + cur.w;
    sm80::wait_ring<kStages>(dist);
    cutlass::arch::fence_view_async_shared();
    __syncthreads();
    if (ld.s < steps) load_step(ld);
    dev::cp_async_commit();
    ld.advance<kStages>(n_blocks);

    SlotSm90<Traits> o = outer_at(cur.w & 1);
    Tensor sQ = make_tensor(make_smem_ptr(o.qk), typename Traits::RowsQK{});
    Tensor sdO = make_tensor(make_smem_ptr(o.v), typename Traits::RowsV{});
    if (j == 0) {
      if (p.q_mult != 1.0f) scale_tile_rows<Traits>(sQ, D, p.q_mult, tidx);
      CUTE_UNROLL
      for (int mi = 0; mi < kRows; ++mi) {
        const int row = int(get<0>(cS_rc(mi, 0)));
        row_lse2[mi] = o.lse2[row];
        row_delta[mi] = o.delta[row];
      }
    }
    SlotSm90<Traits> in = inner_at(cur.slot);
    Tensor sK = make_tensor(make_smem_ptr(in.qk), typename Traits::RowsQK{});
    Tensor sKt = make_tensor(make_smem_ptr(in.qk), typename Traits::RowsQKt{});
    Tensor sV = make_tensor(make_smem_ptr(in.v), typename Traits::RowsV{});

    // S and dP queued back to back; P is formed while dP runs.
    Tensor acc_s = partition_fragment_C(mma_s, Shape<_64, _64>{});
    Tensor acc_dp = partition_fragment_C(mma_p, Shape<_64, _64>{});
    wgmma_issue<true>(mma_s, acc_s, thr_s.make_fragment_A(thr_s.partition_A(sQ)),
                      thr_s.make_fragment_B(thr_s.partition_B(sK)));
    wgmma_issue<true>(mma_p, acc_dp, thr_p.make_fragment_A(thr_p.partition_A(sdO)),
                      thr_p.make_fragment_B(thr_p.partition_B(sV)));

    Tensor S = make_tensor(acc_s.data(), rowcol_layout(acc_s.layout()));
    Tensor dP = make_tensor(acc_dp.data(), rowcol_layout(acc_dp.layout()));
    const bool masked = j == 0 && partial_limit < kBlockN;
    warpgroup_wait<1>();
    warpgroup_fence_operand(acc_s);
    CUTE_UNROLL
    for (int mi = 0; mi < kRows; ++mi) {
      CUTE_UNROLL
      for (int ni = 0; ni < size<1>(S); ++ni) {
        const float pv = exp2f(S(mi, ni) * scale_log2 - row_lse2[mi]);
        S(mi, ni) = masked && int(get<1>(cS_rc(mi, ni))) >= partial_limit ? 0.f : pv;
      }
    }
    warpgroup_fence_operand(acc_s);
    warpgroup_wait<0>();
    warpgroup_fence_operand(acc_dp);
    CUTE_UNROLL
    for (int mi = 0; mi < kRows; ++mi) {
      CUTE_UNROLL
      for (int ni = 0; ni < size<1>(S); ++ni) dP(mi, ni) = S(mi, ni) * (dP(mi, ni) - row_delta[mi]);
    }
    Tensor rdS = scores_as_a<Element>(acc_dp);
    wgmma_issue<false>(mma_gqk, acc_dq, make_tensor(rdS.data(), acc_as_a_layout(rdS.layout())),
                       thr_gqk.make_fragment_B(thr_gqk.partition_B(sKt)));
    warpgroup_wait<0>();
    warpgroup_fence_operand(acc_dq);

    if (j == n_blocks - 1) {  // window done: dq (and per-window dbias_q) out, those columns cleared
      Element* dq_base = static_cast<Element*>(p.dq) + (int64_t(b) * N * H + h) * D;
      sm80::store_rows(dQ, cdq_rc, dq_base, out_row_stride, m0, N, D, p.scale);
      sm80::clear_columns(dQ, cdq_rc, D, false);
      if (p.bias_batched && R > 0) {
        sm80::store_factor_rows(dQ, cdq_rc, p.dbq_part + (int64_t(b) * H + h) * N * R, m0, N, D, R, 1.0f);
        sm80::clear_columns(dQ, cdq_rc, D, true);
      }
    }
  }
  if (!p.bias_batched && R > 0 && steps > 0) {
    const int chunk = cta.b_begin / p.chunk_windows;
    sm80::store_factor_rows(dQ, cdq_rc, p.dbq_part + (int64_t(chunk) * H + h) * N * R, m0, N, D, R, 1.0f);
  }
#else
  __trap();
#endif
}

template <class Kernel>
cudaError_t launch_bwd_tiles(Kernel kernel, int64_t grid, int smem, const RfbiasBwdParams& p, cudaStream_t stream) {
  if (grid <= 0) return cudaSuccess;
  if (grid > 0x7fffffffLL) return cudaErrorInvalidConfiguration;
  cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  if (e != cudaSuccess) return e;
  kernel<<<dim3(unsigned(grid)), dim3(128), smem, stream>>>(p);
  return cudaGetLastError();
}

// The two main kernels (the prep, factor-scaling and reduction launches stay sm80's, see sm80/launch_bwd.h).
template <typename Element, int kDqk, int kDv>
cudaError_t run_bwd_main(const RfbiasBwdParams& p, cudaStream_t stream) {
  using Traits = BwdTraitsSm90<Element, kDqk, kDv>;
  const int64_t per_block = int64_t(p.H) * p.n_chunks;
  const int64_t blocks = (p.N + 63) / 64;
  cudaError_t e = p.qkv_vec16
      ? launch_bwd_tiles(&bwd_dkdv_kernel<Traits, true>, blocks * per_block, Traits::kSmemBytes, p, stream)
      : launch_bwd_tiles(&bwd_dkdv_kernel<Traits, false>, blocks * per_block, Traits::kSmemBytes, p, stream);
  if (e != cudaSuccess) return e;
  return p.qkv_vec16
      ? launch_bwd_tiles(&bwd_dq_kernel<Traits, true>, blocks * per_block, Traits::kSmemBytes, p, stream)
      : launch_bwd_tiles(&bwd_dq_kernel<Traits, false>, blocks * per_block, Traits::kSmemBytes, p, stream);
}

}  // namespace sm90
}  // namespace rfsr
