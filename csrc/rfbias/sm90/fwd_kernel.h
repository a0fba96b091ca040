// sm90a forward kernel: warpgroup MMA (wgmma) for both GEMMs of flash_rfbias.
//
// One CTA computes a kBlockM-row query tile of one (window, head) with one or two warpgroups (64 rows each):
//   S  = [q*q_mult | bias_q*bq_mult | 0] . [k | bias_k | 0]^T     wgmma, both operands in shared memory
//   P  = exp2(S * scale_log2 - rowmax * scale_log2)               online softmax in registers (exp2 domain)
//   O += P . v                                                    wgmma, P from registers, v in shared memory
// The data path is the sm80 kernel's (fwd_kernel.h in sm80/): cp.async by all threads into a kStages-deep K/V ring,
// 16-byte copies where rows allow and 4-byte ones otherwise (D = 30), key tiles walked last (partial) first, one
// CTA barrier per tile. Copy plans (per-thread source pointers and swizzled offsets) are built once per CTA, the
// copy width being a template parameter. Step j queues S(j + 1) and then O += P(j) V(j) on the tensor cores, waits
// for S(j + 1) only and runs its softmax while the PV product runs. Shared-memory tiles use the swizzled layouts
// wgmma reads (GMMA canonical layouts), so each copy goes to the swizzled address of its (row, column); copies are
// generic-proxy writes, hence the async-proxy fence before the barrier that hands a tile to wgmma.
#pragma once

#include <cmath>
#include <cstdint>

#include "../params.h"
#include "../common/utils.h"
#include "../sm80/copy.h"

#include <cute/tensor.hpp>
#include <cute/atom/mma_atom.hpp>
#include <cute/arch/mma_sm90.hpp>
#include <cute/atom/mma_traits_sm90_gmma.hpp>
#include <cutlass/arch/barrier.h>
#include <cutlass/gemm/collective/builders/sm90_common.inl>
#include <cutlass/numeric_types.h>
#include <cutlass/numeric_conversion.h>

namespace rfsr {
namespace sm90 {

template <typename Element_, int kDqk_, int kDv_, int kWarpgroups_, int kBlockN_, int kStages_, int kMinBlocks_>
struct FwdTraitsSm90 {
  using Element = Element_;
  static constexpr int kDqk = kDqk_;
  static constexpr int kDv = kDv_;
  static constexpr int kWarpgroups = kWarpgroups_;
  static constexpr int kBlockM = 64 * kWarpgroups;  // each warpgroup owns 64 query rows
  static constexpr int kBlockN = kBlockN_;
  static constexpr int kNThreads = 128 * kWarpgroups;
  static constexpr int kStages = kStages_;
  static constexpr int kMinBlocks = kMinBlocks_;
  static_assert(kStages >= 3, "tiles t - 2, t - 1 (in use) and t (landing) need their own slots");
  static_assert(kDqk % 16 == 0 && kDv % 16 == 0 && kBlockN % 16 == 0, "wgmma tile constraints");

  using TiledMmaS = decltype(cute::make_tiled_mma(
      cute::GMMA::ss_op_selector<Element, Element, float, cute::Shape<cute::_64, cute::Int<kBlockN>, cute::Int<kDqk>>>(),
      cute::Layout<cute::Shape<cute::Int<kWarpgroups>, cute::_1, cute::_1>>{}));
  using TiledMmaO = decltype(cute::make_tiled_mma(
      cute::GMMA::rs_op_selector<Element, Element, float, cute::Shape<cute::_64, cute::Int<kDv>, cute::Int<kBlockN>>,
                                 cute::GMMA::Major::K, cute::GMMA::Major::MN>(),
      cute::Layout<cute::Shape<cute::Int<kWarpgroups>, cute::_1, cute::_1>>{}));

  // K-major tiles of packed rows (queries, keys) and the MN-major (d-contiguous) V^T tile.
  using SmemLayoutQ = decltype(cute::tile_to_shape(
      cutlass::gemm::collective::detail::ss_smem_selector<cute::GMMA::Major::K, Element, cute::Int<kBlockM>,
                                                          cute::Int<kDqk>>(),
      cute::Shape<cute::Int<kBlockM>, cute::Int<kDqk>>{}));
  using SmemLayoutK = decltype(cute::tile_to_shape(
      cutlass::gemm::collective::detail::ss_smem_selector<cute::GMMA::Major::K, Element, cute::Int<kBlockN>,
                                                          cute::Int<kDqk>>(),
      cute::Shape<cute::Int<kBlockN>, cute::Int<kDqk>>{}));
  using SmemLayoutVt = decltype(cute::tile_to_shape(
      cutlass::gemm::collective::detail::ss_smem_selector<cute::GMMA::Major::MN, Element, cute::Int<kDv>,
                                                          cute::Int<kBlockN>>(),
      cute::Shape<cute::Int<kDv>, cute::Int<kBlockN>>{}));

  // Tiles start at multiples of 1024 bytes (the largest swizzle period).
  static constexpr int align1k(int bytes) { return (bytes + 1023) / 1024 * 1024; }
  static constexpr int kBytesQ = align1k(kBlockM * kDqk * int(sizeof(Element)));
  static constexpr int kBytesK = align1k(kBlockN * kDqk * int(sizeof(Element)));
  static constexpr int kBytesV = align1k(kBlockN * kDv * int(sizeof(Element)));
  static constexpr int kSmemBytes = kBytesQ + kStages * (kBytesK + kBytesV) + 1024;  // + alignment slack
};

// Switches for tile experiments (narrow buckets: key-tile width, CTAs per SM asked of the register allocator; all
// buckets: warpgroups per CTA, K/V ring depth). Measured on an H200 (bf16, SST shapes): 2 warpgroups with 64-key
// tiles at 2 CTAs/SM beat 128-key tiles at 1 CTA/SM by 25-35%, one warpgroup per CTA (4 CTAs/SM) and 3 stages did not
// help (benchmarks/results/fwd-kernel-notes-h200-2026-11-27.md). Re-measured after the copy rework (2026-11-27):
// 128-key tiles at 1 CTA/SM 16-35% slower, 4 stages within 2% (benchmarks/results/fwd-kernel-work-h200-2026-11-27/).
#ifndef RFSR_SM90_BLOCK_N
#define RFSR_SM90_BLOCK_N 64
#endif
#ifndef RFSR_SM90_MIN_BLOCKS
#define RFSR_SM90_MIN_BLOCKS 2
#endif
#ifndef RFSR_SM90_WARPGROUPS
#define RFSR_SM90_WARPGROUPS 2
#endif
#ifndef RFSR_SM90_STAGES
#define RFSR_SM90_STAGES 3
#endif

// Tile choice per head-dim bucket (one place).
template <typename Element, int kDqk, int kDv>
struct FwdConfigSm90 {
  static constexpr bool kWide = kDqk + kDv > 160;  // accumulators too large for the 128-register budget
  static constexpr int kBlockN = kWide ? 64 : RFSR_SM90_BLOCK_N;
  using Traits = FwdTraitsSm90<Element, kDqk, kDv, RFSR_SM90_WARPGROUPS, kBlockN, RFSR_SM90_STAGES,
                               kWide ? 1 : RFSR_SM90_MIN_BLOCKS>;
};

// ((2, 2, N/8), M, N') accumulator -> ((2, 2, 2), M, N/16 * N'): pairs of n8 accumulator chunks are the k16 slices
// of the register A operand of the next wgmma (value order: column pair, row half, k half).
template <class L>
__device__ __forceinline__ auto acc_as_a_layout(L const& l) {
  using namespace cute;
  auto split = logical_divide(get<0, 2>(l), Tile<_2>{});  // ((2, N/16))
  return make_layout(make_layout(get<0, 0>(l), get<0, 1>(l), get<0, 0>(split)), get<1>(l),
                     coalesce(make_layout(get<0, 1>(split), get<2>(l))));
}

// ((2, 2, N/8), M, N') -> ((2, M), (2, N/8, N')): rows first, columns second.
template <class L>
__device__ __forceinline__ auto rowcol_layout(L const& l) {
  using namespace cute;
  return make_layout(make_layout(get<0, 1>(l), get<1>(l)), make_layout(get<0, 0>(l), get<0, 2>(l), get<2>(l)));
}

// Per-thread copy plan into a swizzled tile, computed once per CTA: a thread serves kUnits column units (kVec
// elements each) of every kRowsPerIt-th row. kRowsPerIt is a multiple of the swizzle period (8 rows), so each
// swizzled offset advances by a constant per step (the swizzle pattern is the same in every 1024-byte-aligned slot),
// and the thread's source pointer (its row and column of the head's first row) is formed once: a copy then costs the
// copy and a 64-bit add.
template <int kNThreads, int kRows, int kWidth, int kVec, typename Element>
struct SwizzledRowPlan {
  static constexpr int kPerRow = kWidth / kVec;                                       // units per row
  static constexpr int kThreadsPerRow = kPerRow < kNThreads / 8 ? kPerRow : kNThreads / 8;
  static constexpr int kUnits = kPerRow / kThreadsPerRow;                             // units per thread and row
  static_assert(kPerRow % kThreadsPerRow == 0 && kNThreads % kThreadsPerRow == 0, "whole thread row-groups");
  static constexpr int kRowsPerIt = kNThreads / kThreadsPerRow;
  static_assert(kRowsPerIt % 8 == 0, "row steps must keep the swizzle phase");
  static constexpr int kIts = (kRows + kRowsPerIt - 1) / kRowsPerIt;
  const Element* src;  // this thread's row and column in row 0 of the head
  int64_t row_stride;
  int row, s_step;
  int s_off[kUnits];
  bool col_ok[kUnits];  // column inside [0, D)
  template <class STensor>
  __device__ __forceinline__ SwizzledRowPlan(int tidx, STensor const& s, const Element* head, int64_t stride, int D) {
    row = tidx / kThreadsPerRow;
    const int col0 = (tidx % kThreadsPerRow) * kVec;
    src = head + row * stride + col0;
    row_stride = stride;
    const auto* base = &s(0, 0);
    CUTE_UNROLL
    for (int u = 0; u < kUnits; ++u) {
      s_off[u] = int(&s(row, col0 + u * kThreadsPerRow * kVec) - base);
      col_ok[u] = col0 + u * kThreadsPerRow * kVec < D;
    }
    s_step = kIts > 1 ? int(&s(row + kRowsPerIt, col0) - base) - s_off[0] : 0;
  }
  // Copies columns [0, D) of rows [r0, r0 + valid_rows) of the head into the tile at `dst`; `shift` (elements)
  // moves the source, e.g. to another window of the same head. Full tiles (all but a window's last) take a version
  // without per-row tests.
  __device__ __forceinline__ void copy(Element* dst, int r0, int valid_rows, int64_t shift = 0) const {
    if (valid_rows >= kRows) {
      copy_rows<true>(dst, r0, kRows, shift);
    } else {
      copy_rows<false>(dst, r0, valid_rows, shift);
    }
  }
  template <bool kFull>
  __device__ __forceinline__ void copy_rows(Element* dst, int r0, int valid_rows, int64_t shift = 0) const {
    const Element* g = src + shift + int64_t(r0) * row_stride;
    const int64_t step = int64_t(kRowsPerIt) * row_stride;
    CUTE_UNROLL
    for (int it = 0; it < kIts; ++it) {
      const bool in_tile = kRows % kRowsPerIt == 0 || row + it * kRowsPerIt < kRows;
      if (kFull ? in_tile : row + it * kRowsPerIt < valid_rows) {
        CUTE_UNROLL
        for (int u = 0; u < kUnits; ++u) {
          if (col_ok[u]) {
            if constexpr (kVec == 8) {
              dev::cp_async_16(dst + s_off[u] + it * s_step, g + u * kThreadsPerRow * kVec, true);
            } else {
              dev::cp_async_4(dst + s_off[u] + it * s_step, g + u * kThreadsPerRow * kVec, true);
            }
          }
        }
      }
      g += step;
    }
  }
};

// Factor rows into columns [D, D + R) of a swizzled tile, 4-byte units (vec2) or 2-byte ones. A row's units are
// spread over up to kNThreads / 8 threads (each takes every tpr-th unit, at most kMaxK of them: R <= 128), so rows
// still advance in multiples of 8 and every offset is computed once per CTA.
template <int kNThreads>
struct SwizzledFactorPlan {
  static constexpr int kMaxTpr = kNThreads / 8;
  static constexpr int kMaxK = (128 + kMaxTpr - 1) / kMaxTpr;
  int units, tpr, rows_per_it, row, lane_unit, s_step, nk, kk;
  int s_off[kMaxK];
  bool active;
  template <class STensor>
  __device__ __forceinline__ SwizzledFactorPlan(int tidx, int D, int R, bool vec2, STensor const& s) {
    units = vec2 ? R / 2 : R;
    active = units > 0;
    tpr = max(1, min(units, kMaxTpr));
    rows_per_it = (kNThreads / tpr) / 8 * 8;
    active = active && tidx < rows_per_it * tpr;
    row = tidx / tpr;
    lane_unit = tidx - row * tpr;
    nk = (units - lane_unit + tpr - 1) / tpr;  // units of this thread in a row: kk or kk - 1
    kk = (units + tpr - 1) / tpr;
    const int w = vec2 ? 2 : 1;
    const auto* base = &s(0, 0);
    CUTE_UNROLL
    for (int k = 0; k < kMaxK; ++k) {
      const int u = min(lane_unit + k * tpr, max(units - 1, 0));
      s_off[k] = int(&s(row, D + u * w) - base);
    }
    s_step = int(&s(row + rows_per_it, D + lane_unit * w) - base) - s_off[0];
  }
  // The row loop only advances a pointer and an offset (per-row address arithmetic used to cost more issue slots
  // than the copies); the vec2 test and the units per thread (kK, a template argument: only the last copy of a row is
  // predicated) are outside it. A loop over kMaxK predicated copies cost ~55 instructions a row at R = 34 with one
  // warpgroup copying, and made that rank twice as slow as R = 32 in the warp-specialised forward.
  template <typename Element>
  __device__ __forceinline__ void copy(Element* dst, const Element* g, int64_t row_stride, int valid_rows, bool vec2,
                                       float mult) const {
    if (!active) return;
    copy_k<1>(dst, g, row_stride, valid_rows, vec2, mult);
  }
  template <int kK, typename Element>
  __device__ __forceinline__ void copy_k(Element* dst, const Element* g, int64_t row_stride, int valid_rows, bool vec2,
                                         float mult) const {
    // 1 and 2 units per thread (R <= 4 * kNThreads / 8 with vec2, which holds SST's ranks) get their own loops; more
    // take the loop over kMaxK (fewer instantiations keep the producer's register count down).
    if constexpr (kK < 3) {
      if (kk != kK) {
        copy_k<kK + 1>(dst, g, row_stride, valid_rows, vec2, mult);
        return;
      }
    }
    constexpr int kUnroll = kK < 3 ? kK : kMaxK;
    const int w = vec2 ? 2 : 1;
    const Element* src = g + row * row_stride + lane_unit * w;
    const int64_t step = int64_t(rows_per_it) * row_stride;
    const int src_k = tpr * w;
    int row_off = 0;
    if (vec2) {
      for (int r = row; r < valid_rows; r += rows_per_it, src += step, row_off += s_step) {
        CUTE_UNROLL
        for (int k = 0; k < kUnroll; ++k) {
          if ((kK < 3 && k + 1 < kK) || k < nk) dev::cp_async_4(dst + s_off[k] + row_off, src + k * src_k, true);
        }
      }
    } else {
      for (int r = row; r < valid_rows; r += rows_per_it, src += step, row_off += s_step) {
        CUTE_UNROLL
        for (int k = 0; k < kUnroll; ++k) {
          if ((kK < 3 && k + 1 < kK) || k < nk) {
            uint16_t x = *reinterpret_cast<const uint16_t*>(src + k * src_k);
            if (mult != 1.0f) x = dev::Pack2<Element>::scale1(x, mult);
            *reinterpret_cast<uint16_t*>(dst + s_off[k] + row_off) = x;
          }
        }
      }
    }
  }
};

// kVec16: q/k/v rows are copied in 16-byte units (D % 8 == 0 and aligned rows) instead of 4-byte ones; a template
// parameter so that the copy plans are built once per CTA.
template <class Traits, bool kVec16>
__global__ void __launch_bounds__(Traits::kNThreads, Traits::kMinBlocks) rfbias_fwd_kernel(const RfbiasFwdParams p) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using namespace cute;
  using Element = typename Traits::Element;
  constexpr int kBlockM = Traits::kBlockM;
  constexpr int kBlockN = Traits::kBlockN;
  constexpr int kDv = Traits::kDv;
  constexpr int kNThreads = Traits::kNThreads;
  constexpr int kStages = Traits::kStages;

  extern __shared__ uint8_t smem_dyn[];
  uint8_t* smem = reinterpret_cast<uint8_t*>((reinterpret_cast<uintptr_t>(smem_dyn) + 1023) & ~uintptr_t(1023));
  Element* sQ_ptr = reinterpret_cast<Element*>(smem);
  uint8_t* sK_base = smem + Traits::kBytesQ;
  uint8_t* sV_base = sK_base + kStages * Traits::kBytesK;
  auto sK_at = [&](int slot) { return reinterpret_cast<Element*>(sK_base + slot * Traits::kBytesK); };
  auto sV_at = [&](int slot) { return reinterpret_cast<Element*>(sV_base + slot * Traits::kBytesV); };

  const int tidx = threadIdx.x;
  const int N = p.N, D = p.D, R = p.R;
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
  const Element* bq_base = static_cast<const Element*>(p.bias_q) + b * p.bq_batch_stride + h * p.bq_head_stride;
  const Element* bk_base = static_cast<const Element*>(p.bias_k) + b * p.bk_batch_stride + h * p.bk_head_stride;

  // 1. Clear everything once: pad columns and rows past N stay zero (partial tiles are loaded first).
  {
    uint4* z = reinterpret_cast<uint4*>(smem);
    constexpr int kVec = (Traits::kBytesQ + kStages * (Traits::kBytesK + Traits::kBytesV)) / 16;
    for (int i = tidx; i < kVec; i += kNThreads) z[i] = make_uint4(0, 0, 0, 0);
  }
  __syncthreads();

  Tensor sQ = make_tensor(make_smem_ptr(sQ_ptr), typename Traits::SmemLayoutQ{});
  const int n_blocks = (N + kBlockN - 1) / kBlockN;

  // Copy plans (per-CTA offsets into the swizzled tiles; slot 0 stands for every slot).
  Tensor sK0 = make_tensor(make_smem_ptr(sK_at(0)), typename Traits::SmemLayoutK{});
  Tensor sVt0 = make_tensor(make_smem_ptr(sV_at(0)), typename Traits::SmemLayoutVt{});
  Tensor sV0 = make_tensor(sVt0.data(), select<1, 0>(sVt0.layout()));  // (key, d) view of V^T
  constexpr int kVec = kVec16 ? 8 : 2;
  const SwizzledRowPlan<kNThreads, kBlockN, kDv, kVec, Element> plan_k(tidx, sK0, k_base, p.k_row_stride, D);
  const SwizzledRowPlan<kNThreads, kBlockN, kDv, kVec, Element> plan_v(tidx, sV0, v_base, p.v_row_stride, D);
  const SwizzledFactorPlan<kNThreads> plan_bk(tidx, D, R, p.bias_vec2, sK0);
  const SwizzledFactorPlan<kNThreads> plan_bq(tidx, D, R, p.bias_vec2, sQ);

  auto load_kv = [&](int j) {
    const int n0 = (n_blocks - 1 - j) * kBlockN;
    const int valid = min(kBlockN, N - n0);
    const int slot = j % kStages;
    plan_k.copy(sK_at(slot), n0, valid);
    plan_v.copy(sV_at(slot), n0, valid);
    plan_bk.copy(sK_at(slot), bk_base + int64_t(n0) * p.bk_row_stride, p.bk_row_stride, valid, p.bias_vec2, 1.0f);
  };

  // 2. Query tile (+ factor rows) in the first group with the first K/V tile.
  const int q_valid = min(kBlockM, N - m0);
  {
    const SwizzledRowPlan<kNThreads, kBlockM, kDv, kVec, Element> plan_q(tidx, sQ, q_base, p.q_row_stride, D);
    plan_q.copy(sQ_ptr, m0, q_valid);
  }
  plan_bq.copy(sQ_ptr, bq_base + int64_t(m0) * p.bq_row_stride, p.bq_row_stride, q_valid, p.bias_vec2, p.bq_mult);
  CUTE_UNROLL
  for (int j = 0; j < kStages - 1; ++j) {
    if (j < n_blocks) load_kv(j);
    dev::cp_async_commit();
  }

  // 3. MMA partitions: each warpgroup owns 64 query rows.
  typename Traits::TiledMmaS mma_s;
  typename Traits::TiledMmaO mma_o;
  auto thr_s = mma_s.get_thread_slice(tidx);
  auto thr_o = mma_o.get_thread_slice(tidx);
  Tensor tSrQ = thr_s.make_fragment_A(thr_s.partition_A(sQ));
  Tensor acc_o = partition_fragment_C(mma_o, Shape<Int<kBlockM>, Int<kDv>>{});
  clear(acc_o);

  Tensor cS = thr_s.partition_C(make_identity_tensor(Shape<Int<kBlockM>, Int<kBlockN>>{}));
  Tensor cS_rc = make_tensor(cS.data(), rowcol_layout(cS.layout()));
  constexpr int kRows = decltype(size<0>(cS_rc))::value;
  float row_max[kRows], row_sum[kRows];
  CUTE_UNROLL
  for (int i = 0; i < kRows; ++i) {
    row_max[i] = -INFINITY;
    row_sum[i] = 0.f;
  }
  const float scale_log2 = p.scale_log2;

  // Issues S = Q . K(tile j)^T (asynchronous; the caller commits and waits).
  auto issue_s = [&](auto& acc, int j) {
    Tensor sK = make_tensor(make_smem_ptr(sK_at(j % kStages)), typename Traits::SmemLayoutK{});
    Tensor tSrK = thr_s.make_fragment_B(thr_s.partition_B(sK));
    warpgroup_fence_operand(acc);
    warpgroup_arrive();
    mma_s.accumulate_ = GMMA::ScaleOut::Zero;
    CUTE_UNROLL
    for (int kb = 0; kb < size<2>(tSrQ); ++kb) {
      cute::gemm(mma_s, tSrQ(_, _, kb), tSrK(_, _, kb), acc);
      mma_s.accumulate_ = GMMA::ScaleOut::One;
    }
    warpgroup_commit_batch();
  };
  // Makes tile t (t >= 1, called during step t - 1) visible to wgmma: its copies have landed for every thread (one
  // commit group per tile, empty ones included, so the wait count is fixed), the async-proxy fence hands the
  // generic-proxy writes to wgmma, and after the barrier every warp is done with tile t - 2 (its S and PV products
  // were retired in earlier steps), whose slot then receives tile t - 2 + kStages.
  auto arrive_tile = [&](int t) {
    dev::cp_async_wait<kStages - 3>();
    cutlass::arch::fence_view_async_shared();
    __syncthreads();
    if (t - 2 + kStages < n_blocks) load_kv(t - 2 + kStages);
    dev::cp_async_commit();
  };

  // Prologue: tile 0 (and the query tile) landed, q_mult / bq_mult applied in place, S(0) computed.
  dev::cp_async_wait<kStages - 2>();
  if (p.q_mult != 1.0f || (R > 0 && p.bias_vec2 && p.bq_mult != 1.0f)) {
    __syncthreads();  // with 16-byte copies a thread's words are not the ones it copied
    const int words = (D + R + 1) / 2;
    for (int i = tidx; i < q_valid * words; i += kNThreads) {
      const int r = i / words, c = (i - r * words) * 2;
      const bool is_q = c < D;
      const float mult = is_q ? p.q_mult : p.bq_mult;
      // factor words copied synchronously (odd rank / unaligned) were scaled on the way
      if (mult != 1.0f && (is_q || p.bias_vec2)) {
        uint32_t* w = reinterpret_cast<uint32_t*>(&sQ(r, c));
        *w = dev::Pack2<Element>::scale(*w, mult);
      }
    }
  }
  cutlass::arch::fence_view_async_shared();
  __syncthreads();

  // Online softmax of one S tile (tile j) in place: mask, row maxima, exponentials (exp2 domain), row sums. Returns
  // through `corr` the factor the running O must be multiplied by (applied later, outside any wgmma batch window).
  float corr[kRows];
  // Only tile 0 (the window's last keys) can be partial: the loop's calls pass kFirst = false and have no mask code.
  auto softmax = [&](auto& acc, auto first) {
    constexpr bool kFirst = decltype(first)::value;
    Tensor S = make_tensor(acc.data(), rowcol_layout(acc.layout()));
    if (kFirst && n_blocks * kBlockN > N) {
      const int limit = N - (n_blocks - 1) * kBlockN;
      CUTE_UNROLL
      for (int mi = 0; mi < size<0>(S); ++mi) {
        CUTE_UNROLL
        for (int ni = 0; ni < size<1>(S); ++ni) {
          if (int(get<1>(cS_rc(mi, ni))) >= limit) S(mi, ni) = -INFINITY;
        }
      }
    }
    CUTE_UNROLL
    for (int mi = 0; mi < kRows; ++mi) {
      const float mx = fmaxf(row_max[mi], dev::quad_max(dev::row_max(S, mi)));
      corr[mi] = exp2f((row_max[mi] - mx) * scale_log2);  // exp2(-inf) = 0 on the first tile
      row_max[mi] = mx;
      row_sum[mi] = row_sum[mi] * corr[mi] + dev::row_exp2_sum(S, mi, scale_log2, mx * scale_log2);
    }
  };

  // P of the tile whose PV product comes next, as the register A operand of that wgmma. It is only written when no
  // wgmma batch is open (ptxas serialises the wgmmas otherwise).
  Tensor acc_s = partition_fragment_C(mma_s, Shape<Int<kBlockM>, Int<kBlockN>>{});
  Tensor rP = make_tensor<Element>(acc_s.layout());
  Tensor tOrP = make_tensor(rP.data(), acc_as_a_layout(rP.layout()));
  auto convert_p = [&]() {
    constexpr int kN = decltype(size(acc_s))::value;
    cutlass::NumericArrayConverter<Element, float, kN> conv;
    *reinterpret_cast<cutlass::Array<Element, kN>*>(rP.data()) =
        conv(*reinterpret_cast<const cutlass::Array<float, kN>*>(acc_s.data()));
  };
  auto rescale_o = [&]() {
    Tensor O = make_tensor(acc_o.data(), rowcol_layout(acc_o.layout()));
    CUTE_UNROLL
    for (int mi = 0; mi < kRows; ++mi) {
      CUTE_UNROLL
      for (int di = 0; di < size<1>(O); ++di) O(mi, di) *= corr[mi];
    }
  };

  issue_s(acc_s, 0);
  warpgroup_wait<0>();
  warpgroup_fence_operand(acc_s);
  softmax(acc_s, cute::true_type{});
  convert_p();  // O is still zero: no rescale

  // Step j: P(j) is in rP. S(j + 1) is computed first (its batch retired right away: no other instruction may touch
  // the registers of an open batch's accumulator), then O += P(j) V(j) runs on the tensor cores while the softmax of
  // S(j + 1) runs on the other units; after it retires, O is rescaled and P(j + 1) converted.
  auto issue_pv = [&](int j) {
    Tensor sVt = make_tensor(make_smem_ptr(sV_at(j % kStages)), typename Traits::SmemLayoutVt{});
    Tensor tOrVt = thr_o.make_fragment_B(thr_o.partition_B(sVt));
    warpgroup_fence_operand(acc_o);
    warpgroup_arrive();
    CUTE_UNROLL
    for (int kb = 0; kb < size<2>(tOrP); ++kb) {
      cute::gemm(mma_o, tOrP(_, _, kb), tOrVt(_, _, kb), acc_o);
    }
    warpgroup_commit_batch();
  };
  // O += P(j) V(j) is queued right behind S(j + 1): the tensor cores run both back to back while this warpgroup
  // waits for S(j + 1) only (batches retire in order), then does the softmax of S(j + 1) during the PV product. The
  // last step is peeled off so that the loop body has no branch between the two batches (ptxas serialises the wgmmas
  // when it cannot see that the accumulator read by the softmax belongs to a retired batch).
  for (int j = 0; j + 1 < n_blocks; ++j) {
    arrive_tile(j + 1);
    issue_s(acc_s, j + 1);
    issue_pv(j);
    warpgroup_wait<1>();
    warpgroup_fence_operand(acc_s);
    softmax(acc_s, cute::false_type{});
    warpgroup_fence_operand(acc_s);  // keeps the softmax ahead of the wait below (ptxas would hoist the wait)
    warpgroup_wait<0>();
    warpgroup_fence_operand(acc_o);
    rescale_o();
    convert_p();
  }
  issue_pv(n_blocks - 1);
  warpgroup_wait<0>();
  warpgroup_fence_operand(acc_o);

  // 4. Epilogue: normalise, write out (4-byte stores: D is even) and lse.
  Tensor O = make_tensor(acc_o.data(), rowcol_layout(acc_o.layout()));
  Tensor cO = thr_o.partition_C(make_identity_tensor(Shape<Int<kBlockM>, Int<kDv>>{}));
  Tensor cO_rc = make_tensor(cO.data(), rowcol_layout(cO.layout()));
  Element* out_base = static_cast<Element*>(p.out) + b * p.out_batch_stride + h * p.out_head_stride;
  float* lse_base = p.lse + (int64_t(b) * p.H + h) * N;
  constexpr float kLn2 = 0.69314718055994530942f;
  CUTE_UNROLL
  for (int mi = 0; mi < size<0>(O); ++mi) {
    const float sum = dev::quad_sum(row_sum[mi]);
    const float inv = 1.f / sum;
    const int row = m0 + int(get<0>(cO_rc(mi, 0)));
    if (row < N) {
      Element* orow = out_base + int64_t(row) * p.out_row_stride;
      CUTE_UNROLL
      for (int nj = 0; nj < size<1>(O) / 2; ++nj) {
        const int col = int(get<1>(cO_rc(mi, 2 * nj)));
        if (col < D) dev::store_pair(orow + col, O(mi, 2 * nj) * inv, O(mi, 2 * nj + 1) * inv);
      }
      if (int(get<1>(cO_rc(mi, 0))) == 0) lse_base[row] = (row_max[mi] * scale_log2 + log2f(sum)) * kLn2;
    }
  }
#else
  __trap();  // compiled for another architecture: never launched there (the binding checks the device)
#endif
}

template <typename Element, int kDqk, int kDv>
cudaError_t run_fwd_uniform(const RfbiasFwdParams& p, cudaStream_t stream) {
  using Traits = typename FwdConfigSm90<Element, kDqk, kDv>::Traits;
  const int64_t m_blocks = (int64_t(p.N) + Traits::kBlockM - 1) / Traits::kBlockM;
  const int64_t grid = m_blocks * p.B * p.H;
  if (grid <= 0) return cudaSuccess;
  if (grid > 0x7fffffffLL) return cudaErrorInvalidConfiguration;
  auto kernel = p.qkv_vec16 ? &rfbias_fwd_kernel<Traits, true> : &rfbias_fwd_kernel<Traits, false>;
  cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Traits::kSmemBytes);
  if (e != cudaSuccess) return e;
  kernel<<<dim3(unsigned(grid)), dim3(Traits::kNThreads), Traits::kSmemBytes, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace sm90
}  // namespace rfsr
