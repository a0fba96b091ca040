// sm80 (mma.sync m16n8k16) backward kernels of flash_rfbias. Deterministic: no atomics anywhere.
//
// Five launches per call (the binding's 2, then launch_bwd.h):
//   1. bwd_prep_kernel           delta = rowsum(dO o out) and lse2 = lse * log2(e), fp32 (B, H, N).
//   2. rfbias_scale_factor       bq_scaled = bias_q * bq_mult, rounded once like the forward's staging
//                                (rfbias/scale_factor.h, shared with the forward).
//   3. bwd_dkdv_kernel           key-stationary: dK, dV and dbias_k.
//   4. bwd_dq_kernel             query-stationary: dQ and dbias_q.
//   5. bwd_reduce_kernel         factor gradients: fixed-order sum of the per-chunk partials (shared factors) or a
//                                conversion of the per-window rows (per-window factors), fp32 -> input dtype.
//
// Kernels 3 and 4 share one structure. A CTA owns kBlockOuter rows of one head and walks `chunk_windows`
// consecutive windows; per window it streams the other side in kBlockInner-row tiles, last (partial) tile first,
// through a kStages-deep cp.async ring. The window's stationary tile is copied with the window's first inner tile
// (two stationary slots alternate), and its MMA A-operand fragments are loaded into registers once per window.
// Shared-factor gradients stay in the accumulator columns [D, D + R) across the windows of a chunk and are written
// once per chunk; the q/k/v gradient columns are written and cleared after every window.
//
// Kernel 3 works on the transposed problem so that every operand of its second-stage GEMMs is a register
// accumulator (P^T, dS^T) or a transposed shared-memory read:
//   S^T  = Kc . Qs^T,  P^T = exp2(S^T * scale_log2 - lse2[query]),  dP^T = V . dO^T,  dS^T = P^T o (dP^T - delta)
//   dV  += P^T . dO,   [dK | dbias_k] += dS^T . Qs
// Kernel 4 is the forward orientation: S = Qs . Kc^T, dP = dO . V^T, dS = P o (dP - delta), [dQ | dbias_q] += dS . Kc.
// Qs = [q * q_mult | bq_scaled | 0], Kc = [k | bias_k | 0] (params_bwd.h). q_mult (1 for usual scales) is applied
// to the stationary tile's q columns (to K's in kernel 3: exact for the power-of-two q_mult of positive scales).
#pragma once

#include <cmath>
#include <cstdint>

#include "../params_bwd.h"
#include "../common/utils.h"
#include "copy.h"
#include "kernel_traits.h"

#include <cute/tensor.hpp>
#include <cute/atom/mma_atom.hpp>
#include <cute/atom/copy_atom.hpp>
#include <cutlass/numeric_types.h>
#include <cutlass/numeric_conversion.h>

// CTAs per SM the register budget of the narrow buckets aims for (a switch for experiments). Measured on an H200
// (bf16, SST shapes): 3 (<= 168 registers, no spills) gives fwd+bwd 7-17% faster than 2 (about 224 registers).
#ifndef RFSR_BWD_MIN_BLOCKS
#define RFSR_BWD_MIN_BLOCKS 3
#endif

namespace rfsr {
namespace sm80 {

template <typename Element_, int kDqk_, int kDv_>
struct BwdTraitsSm80 {
  using Element = Element_;
  static constexpr int kDqk = kDqk_;
  static constexpr int kDv = kDv_;
  static constexpr int kNWarps = 4;
  static constexpr int kNThreads = 32 * kNWarps;
  // Wide buckets: smaller inner tiles, two stages, stationary fragments re-read from shared memory (registers).
  static constexpr bool kWide = kDqk + kDv > 192;
  static constexpr int kBlockOuter = 16 * kNWarps;  // each warp owns 16 stationary rows
  static_assert(kBlockOuter == kRfbiasBwdBlock, "the host-side chunking assumes this block");
  static constexpr int kBlockInner = kWide ? 32 : 64;
  static constexpr int kStages = kWide ? 2 : 3;
  static constexpr bool kARegs = !kWide;
  static constexpr int kMinBlocks = kWide ? 1 : RFSR_BWD_MIN_BLOCKS;

  static_assert(kDqk % 16 == 0 && kDv % 16 == 0 && kDv <= kDqk, "bad head-dim bucket");

  // Rows padded by 8 elements (16 bytes): conflict-free ldmatrix, and any 4-byte column offset addressable.
  static constexpr int kQKStride = kDqk + 8;
  static constexpr int kVStride = kDv + 8;

  using TiledMma = typename Sm80MmaAtoms<Element, kNWarps>::TiledMma;
  using SmemCopyAtom = typename Sm80MmaAtoms<Element, kNWarps>::SmemCopyAtom;
  using SmemCopyAtomT = typename Sm80MmaAtoms<Element, kNWarps>::SmemCopyAtomT;

  template <int kRows>
  using RowsQK = cute::Layout<cute::Shape<cute::Int<kRows>, cute::Int<kDqk>>,
                              cute::Stride<cute::Int<kQKStride>, cute::_1>>;
  template <int kRows>
  using RowsQKt = cute::Layout<cute::Shape<cute::Int<kDqk>, cute::Int<kRows>>,
                               cute::Stride<cute::_1, cute::Int<kQKStride>>>;
  template <int kRows>
  using RowsV = cute::Layout<cute::Shape<cute::Int<kRows>, cute::Int<kDv>>,
                             cute::Stride<cute::Int<kVStride>, cute::_1>>;
  template <int kRows>
  using RowsVt = cute::Layout<cute::Shape<cute::Int<kDv>, cute::Int<kRows>>,
                              cute::Stride<cute::_1, cute::Int<kVStride>>>;

  // A slot (elements of Element): QK rows, V rows, then two fp32 rows of per-row statistics (lse2, delta).
  template <int kRows>
  static constexpr int slot_elems() {
    return kRows * (kQKStride + kVStride) + 2 * kRows * int(sizeof(float) / sizeof(Element));
  }
  static constexpr int kOuterSlot = slot_elems<kBlockOuter>();
  static constexpr int kInnerSlot = slot_elems<kBlockInner>();
  static_assert(kOuterSlot % 8 == 0 && kInnerSlot % 8 == 0, "slots must keep 16-byte alignment");
  static constexpr int kSmemBytes = (2 * kOuterSlot + kStages * kInnerSlot) * int(sizeof(Element));
};

// Views of one slot.
template <class Traits, int kRows>
struct Slot {
  using Element = typename Traits::Element;
  Element* qk;
  Element* v;
  float* lse2;
  float* delta;
  __device__ __forceinline__ explicit Slot(Element* base) {
    qk = base;
    v = base + kRows * Traits::kQKStride;
    lse2 = reinterpret_cast<float*>(v + kRows * Traits::kVStride);
    delta = lse2 + kRows;
  }
};

// Asynchronous copy of kRows rows of a (B, N, H, D)-strided tensor into columns [0, D) of a slot part.
template <class Traits, int kRows, int kSStride, int kWidth>
__device__ __forceinline__ void copy_rows(typename Traits::Element* s, const typename Traits::Element* g,
                                          int64_t row_stride, int valid, int D, bool vec16, int tidx) {
  if (vec16) {
    copy_tile_async<RowCopyPlan<Traits, kRows, kWidth, 8>, 8, kSStride, true>(
        RowCopyPlan<Traits, kRows, kWidth, 8>(tidx, D), s, g, row_stride, valid);
  } else {
    copy_tile_async<RowCopyPlan<Traits, kRows, kWidth, 2>, 2, kSStride, true>(
        RowCopyPlan<Traits, kRows, kWidth, 2>(tidx, D), s, g, row_stride, valid);
  }
}

// Per-row fp32 statistics (lse2 and delta of rows row0 ..) into a slot; rows past N are zero-filled.
template <int kRows, int kNThreads>
__device__ __forceinline__ void copy_stats(float* s_lse2, float* s_delta, const float* g_lse2, const float* g_delta,
                                           int valid, int tidx) {
  for (int i = tidx; i < 2 * kRows; i += kNThreads) {
    const int r = i < kRows ? i : i - kRows;
    const bool ok = r < valid;
    const float* g = i < kRows ? g_lse2 : g_delta;
    float* s = i < kRows ? s_lse2 : s_delta;
    dev::cp_async_4(s + r, ok ? g + r : g, ok);
  }
}

// Multiplies the q columns [0, D) of this warp's 16 rows of a stationary tile by q_mult, in place (rounded once,
// as the forward does). Only this warp reads those rows (A operand, warps tile the rows), so after the CTA barrier
// that published the copies a warp barrier suffices.
template <class Traits>
__device__ __forceinline__ void scale_warp_rows(typename Traits::Element* qk, int D, float q_mult, int tidx) {
  using Element = typename Traits::Element;
  const int warp = tidx / 32, lane = tidx % 32;
  const int words = D / 2;
  for (int i = lane; i < 16 * words; i += 32) {
    const int r = warp * 16 + i / words, c = (i % words) * 2;
    uint32_t* w = reinterpret_cast<uint32_t*>(qk + r * Traits::kQKStride + c);
    *w = dev::Pack2<Element>::scale(*w, q_mult);
  }
  __syncwarp();
}

// ---------------------------------------------------------------------------------------------------------------
// 1. delta = rowsum(dO o out) and lse2 = lse * log2(e), fp32, one thread per (b, h, n) row.

template <typename Element>
__global__ void bwd_prep_kernel(const RfbiasBwdParams p) {
  constexpr float kLog2e = 1.4426950408889634f;
  const int64_t rows = int64_t(p.B) * p.H * p.N;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < rows; i += int64_t(gridDim.x) * blockDim.x) {
    const int n = int(i % p.N);
    const int64_t bh = i / p.N;
    const int h = int(bh % p.H);
    const int b = int(bh / p.H);
    const Element* o = static_cast<const Element*>(p.out) + b * p.o_batch_stride + h * p.o_head_stride +
                       int64_t(n) * p.o_row_stride;
    const Element* d = static_cast<const Element*>(p.dout) + b * p.do_batch_stride + h * p.do_head_stride +
                       int64_t(n) * p.do_row_stride;
    float acc = 0.f;
    for (int c = 0; c < p.D; c += 2) {
      const cutlass::Array<Element, 2> ov = *reinterpret_cast<const cutlass::Array<Element, 2>*>(o + c);
      const cutlass::Array<Element, 2> dv = *reinterpret_cast<const cutlass::Array<Element, 2>*>(d + c);
      acc += float(ov[0]) * float(dv[0]);
      acc += float(ov[1]) * float(dv[1]);
    }
    p.delta[i] = acc;
    p.lse2[i] = p.lse[i] * kLog2e;
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Shared pieces of kernels 3 and 4.

// Decodes a CTA: consecutive CTAs are the row blocks of one (chunk, head), so a window's tiles are re-read from L2.
struct BwdCta {
  int block, h, b_begin, b_end;
  __device__ __forceinline__ BwdCta(const RfbiasBwdParams& p, int n_blocks) {
    const int64_t bid = blockIdx.x;
    block = int(bid % n_blocks);
    const int64_t rest = bid / n_blocks;
    const int chunk = int(rest % p.n_chunks);
    h = int(rest / p.n_chunks);
    b_begin = chunk * p.chunk_windows;
    b_end = min(p.B, b_begin + p.chunk_windows);
  }
};

// Clears the whole dynamic shared memory once: pad columns stay zero for the CTA's lifetime.
template <int kBytes, int kNThreads>
__device__ __forceinline__ void clear_smem(uint4* smem, int tidx) {
  static_assert(kBytes % 16 == 0, "");
  for (int i = tidx; i < kBytes / 16; i += kNThreads) smem[i] = make_uint4(0, 0, 0, 0);
}

// Ring-prefetch distance: up to kStages - 1 tiles ahead, but never so far ahead that the stationary slot of the
// window after next (two slots alternate) is written while this window's fragments are still being read.
template <int kStages>
__device__ __forceinline__ int prefetch_distance(int inner_blocks) {
  return min(kStages - 1, 2 * inner_blocks - 1);
}

// A step of the walk: step number s, window w of the chunk, inner tile j of the window, ring slot. Advanced by
// counters: the divisions by the tile count and the ring size cost more issue slots per step than they seem.
struct BwdStep {
  int s = 0, w = 0, j = 0, slot = 0;
  template <int kStages>
  __device__ __forceinline__ void advance(int inner_blocks) {
    ++s;
    if (++j == inner_blocks) {
      j = 0;
      ++w;
    }
    if (++slot == kStages) slot = 0;
  }
};

template <int kStages>
__device__ __forceinline__ void wait_ring(int dist) {
  if (kStages > 2 && dist >= 2) {
    dev::cp_async_wait<(kStages > 2 ? 1 : 0)>();
  } else {
    dev::cp_async_wait<0>();
  }
}

// Factor-gradient rows of an accumulator: columns [D, D + R) of rows row0.. < N, times mult, into part (N, R).
template <class Tensor, class Coord>
__device__ __forceinline__ void store_factor_rows(Tensor const& acc_rc, Coord const& c_rc, float* part, int row0,
                                                  int N, int D, int R, float mult) {
  using namespace cute;
  CUTE_UNROLL
  for (int mi = 0; mi < size<0>(acc_rc); ++mi) {
    const int row = row0 + int(get<0>(c_rc(mi, 0)));
    if (row >= N) continue;
    CUTE_UNROLL
    for (int ni = 0; ni < size<1>(acc_rc); ++ni) {
      const int r = int(get<1>(c_rc(mi, ni))) - D;
      if (r >= 0 && r < R) part[int64_t(row) * R + r] = acc_rc(mi, ni) * mult;
    }
  }
}

// Element columns [D, D + R) (factor part) cleared when `factor` is true, columns [0, D) otherwise.
template <class Tensor, class Coord>
__device__ __forceinline__ void clear_columns(Tensor& acc_rc, Coord const& c_rc, int D, bool factor) {
  using namespace cute;
  CUTE_UNROLL
  for (int mi = 0; mi < size<0>(acc_rc); ++mi) {
    CUTE_UNROLL
    for (int ni = 0; ni < size<1>(acc_rc); ++ni) {
      if ((int(get<1>(c_rc(mi, ni))) >= D) == factor) acc_rc(mi, ni) = 0.f;
    }
  }
}

// Element columns [0, D) of an accumulator, times mult, into rows of a (B, N, H, D)-contiguous gradient.
template <typename Element, class Tensor, class Coord>
__device__ __forceinline__ void store_rows(Tensor const& acc_rc, Coord const& c_rc, Element* base,
                                           int64_t row_stride, int row0, int N, int D, float mult) {
  using namespace cute;
  CUTE_UNROLL
  for (int mi = 0; mi < size<0>(acc_rc); ++mi) {
    const int row = row0 + int(get<0>(c_rc(mi, 0)));
    if (row >= N) continue;
    CUTE_UNROLL
    for (int nj = 0; nj < size<1>(acc_rc) / 2; ++nj) {
      const int col = int(get<1>(c_rc(mi, 2 * nj)));
      if (col < D) dev::store_pair(base + row * row_stride + col, acc_rc(mi, 2 * nj) * mult, acc_rc(mi, 2 * nj + 1) * mult);
    }
  }
}

// ---------------------------------------------------------------------------------------------------------------
// 3. dK, dV, dbias_k: key-stationary.

template <class Traits>
__global__ void __launch_bounds__(Traits::kNThreads, Traits::kMinBlocks) bwd_dkdv_kernel(const RfbiasBwdParams p) {
  using namespace cute;
  using Element = typename Traits::Element;
  constexpr int kBlockN = Traits::kBlockOuter;  // keys owned by the CTA
  constexpr int kBlockM = Traits::kBlockInner;  // queries per step
  constexpr int kDqk = Traits::kDqk;
  constexpr int kDv = Traits::kDv;
  constexpr int kNThreads = Traits::kNThreads;
  constexpr int kStages = Traits::kStages;
  constexpr int kQKStride = Traits::kQKStride;
  constexpr int kVStride = Traits::kVStride;

  extern __shared__ uint4 smem_raw[];
  Element* outer_base = reinterpret_cast<Element*>(smem_raw);
  Element* inner_base = outer_base + 2 * Traits::kOuterSlot;

  const int tidx = threadIdx.x;
  const int N = p.N, D = p.D, R = p.R, H = p.H;
  const int n_blocks = (N + kBlockN - 1) / kBlockN;
  const int m_blocks = (N + kBlockM - 1) / kBlockM;
  const BwdCta cta(p, n_blocks);
  const int h = cta.h;
  const int n0 = cta.block * kBlockN;
  const int n_valid = min(kBlockN, N - n0);
  const int steps = (cta.b_end - cta.b_begin) * m_blocks;
  const int dist = prefetch_distance<kStages>(m_blocks);
  const bool vec16 = p.qkv_vec16;

  clear_smem<Traits::kSmemBytes, kNThreads>(smem_raw, tidx);
  __syncthreads();

  const FactorCopyPlan plan_bk(tidx, kNThreads, R, p.bias_vec2);
  const FactorCopyPlan plan_bq(tidx, kNThreads, R, p.bqs_vec2);
  const Element* bqs_head = static_cast<const Element*>(p.bq_scaled) + int64_t(h) * N * R;
  const int64_t bqs_batch = p.bias_batched ? int64_t(H) * N * R : 0;

  // Step s = (window w, query tile j); tiles are walked from the last (partial) one.
  auto load_step = [&](const BwdStep& st) {
    const int w = st.w;
    const int j = st.j;
    const int b = cta.b_begin + w;
    if (j == 0) {  // the window's stationary tile: [k | bias_k] and v rows of this key block
      Slot<Traits, kBlockN> o(outer_base + (w & 1) * Traits::kOuterSlot);
      const Element* gk = static_cast<const Element*>(p.k) + b * p.k_batch_stride + h * p.k_head_stride +
                          int64_t(n0) * p.k_row_stride;
      const Element* gv = static_cast<const Element*>(p.v) + b * p.v_batch_stride + h * p.v_head_stride +
                          int64_t(n0) * p.v_row_stride;
      copy_rows<Traits, kBlockN, kQKStride, kDv>(o.qk, gk, p.k_row_stride, n_valid, D, vec16, tidx);
      copy_rows<Traits, kBlockN, kVStride, kDv>(o.v, gv, p.v_row_stride, n_valid, D, vec16, tidx);
      if (R > 0) {
        const Element* gbk = static_cast<const Element*>(p.bias_k) + b * p.bk_batch_stride + h * p.bk_head_stride +
                             int64_t(n0) * p.bk_row_stride;
        copy_factor_rows<kBlockN, kQKStride, true>(plan_bk, o.qk, D, gbk, p.bk_row_stride, n_valid, p.bias_vec2);
      }
    }
    const int m0 = (m_blocks - 1 - j) * kBlockM;
    const int valid = min(kBlockM, N - m0);
    Slot<Traits, kBlockM> in(inner_base + st.slot * Traits::kInnerSlot);
    const Element* gq = static_cast<const Element*>(p.q) + b * p.q_batch_stride + h * p.q_head_stride +
                        int64_t(m0) * p.q_row_stride;
    const Element* gdo = static_cast<const Element*>(p.dout) + b * p.do_batch_stride + h * p.do_head_stride +
                         int64_t(m0) * p.do_row_stride;
    copy_rows<Traits, kBlockM, kQKStride, kDv>(in.qk, gq, p.q_row_stride, valid, D, vec16, tidx);
    copy_rows<Traits, kBlockM, kVStride, kDv>(in.v, gdo, p.do_row_stride, valid, D, vec16, tidx);
    if (R > 0) {
      copy_factor_rows<kBlockM, kQKStride, true>(plan_bq, in.qk, D, bqs_head + b * bqs_batch + int64_t(m0) * R, R,
                                                 valid, p.bqs_vec2);
    }
    const int64_t stat0 = (int64_t(b) * H + h) * N + m0;
    copy_stats<kBlockM, kNThreads>(in.lse2, in.delta, p.lse2 + stat0, p.delta + stat0, valid, tidx);
  };

  typename Traits::TiledMma tiled_mma;
  auto thr_mma = tiled_mma.get_thread_slice(tidx);
  using LayoutKo = typename Traits::template RowsQK<kBlockN>;
  using LayoutVo = typename Traits::template RowsV<kBlockN>;
  using LayoutQ = typename Traits::template RowsQK<kBlockM>;
  using LayoutQt = typename Traits::template RowsQKt<kBlockM>;
  using LayoutdO = typename Traits::template RowsV<kBlockM>;
  using LayoutdOt = typename Traits::template RowsVt<kBlockM>;

  Tensor tSrK = thr_mma.partition_fragment_A(make_tensor(make_smem_ptr(outer_base), LayoutKo{}));  // S^T A
  Tensor tPrV = thr_mma.partition_fragment_A(make_tensor(make_smem_ptr(outer_base), LayoutVo{}));  // dP^T A
  Tensor tSrQ = thr_mma.partition_fragment_B(make_tensor(make_smem_ptr(inner_base), LayoutQ{}));
  Tensor tPrdO = thr_mma.partition_fragment_B(make_tensor(make_smem_ptr(inner_base), LayoutdO{}));
  Tensor tVrdOt = thr_mma.partition_fragment_B(make_tensor(make_smem_ptr(inner_base), LayoutdOt{}));
  Tensor tKrQt = thr_mma.partition_fragment_B(make_tensor(make_smem_ptr(inner_base), LayoutQt{}));

  auto copy_a = make_tiled_copy_A(typename Traits::SmemCopyAtom{}, tiled_mma);
  auto copy_b = make_tiled_copy_B(typename Traits::SmemCopyAtom{}, tiled_mma);
  auto copy_bt = make_tiled_copy_B(typename Traits::SmemCopyAtomT{}, tiled_mma);
  auto thr_a = copy_a.get_thread_slice(tidx);
  auto thr_b = copy_b.get_thread_slice(tidx);
  auto thr_bt = copy_bt.get_thread_slice(tidx);

  Tensor acc_dv = partition_fragment_C(tiled_mma, Shape<Int<kBlockN>, Int<kDv>>{});
  Tensor acc_dk = partition_fragment_C(tiled_mma, Shape<Int<kBlockN>, Int<kDqk>>{});
  clear(acc_dv);
  clear(acc_dk);
  Tensor dV = make_tensor(acc_dv.data(), dev::rowcol_layout(acc_dv.layout()));
  Tensor dK = make_tensor(acc_dk.data(), dev::rowcol_layout(acc_dk.layout()));
  Tensor cdv = thr_mma.partition_C(make_identity_tensor(Shape<Int<kBlockN>, Int<kDv>>{}));
  Tensor cdk = thr_mma.partition_C(make_identity_tensor(Shape<Int<kBlockN>, Int<kDqk>>{}));
  Tensor cdv_rc = make_tensor(cdv.data(), dev::rowcol_layout(cdv.layout()));
  Tensor cdk_rc = make_tensor(cdk.data(), dev::rowcol_layout(cdk.layout()));

  Tensor cS = thr_mma.partition_C(make_identity_tensor(Shape<Int<kBlockN>, Int<kBlockM>>{}));
  Tensor cS_rc = make_tensor(cS.data(), dev::rowcol_layout(cS.layout()));
  constexpr int kCols = decltype(size<1>(cS_rc))::value;

  const float scale_log2 = p.scale_log2;
  const int64_t out_row_stride = int64_t(H) * D;

  BwdStep ld;  // the step being loaded: always `dist` steps ahead of `cur`
  for (int i = 0; i < dist; ++i) {
    if (ld.s < steps) load_step(ld);
    dev::cp_async_commit();
    ld.advance<kStages>(m_blocks);
  }

  for (BwdStep cur; cur.s < steps; cur.advance<kStages>(m_blocks)) {
    const int w = cur.w;
    const int j = cur.j;
    const int b = cta.b_begin + w;
    wait_ring<kStages>(dist);
    __syncthreads();  // step s has landed for everybody; everybody is done with step s - 1
    if (ld.s < steps) load_step(ld);
    dev::cp_async_commit();
    ld.advance<kStages>(m_blocks);

    Slot<Traits, kBlockN> o(outer_base + (w & 1) * Traits::kOuterSlot);
    Tensor sK = make_tensor(make_smem_ptr(o.qk), LayoutKo{});
    Tensor sV = make_tensor(make_smem_ptr(o.v), LayoutVo{});
    Tensor tSsK = thr_a.partition_S(sK);
    Tensor tPsV = thr_a.partition_S(sV);
    if (j == 0) {
      if (p.q_mult != 1.0f) scale_warp_rows<Traits>(o.qk, D, p.q_mult, tidx);
      if constexpr (Traits::kARegs) {
        cute::copy(copy_a, tSsK, thr_a.retile_D(tSrK));
        cute::copy(copy_a, tPsV, thr_a.retile_D(tPrV));
      }
    }

    Slot<Traits, kBlockM> in(inner_base + cur.slot * Traits::kInnerSlot);
    Tensor sQ = make_tensor(make_smem_ptr(in.qk), LayoutQ{});
    Tensor sQt = make_tensor(make_smem_ptr(in.qk), LayoutQt{});
    Tensor sdO = make_tensor(make_smem_ptr(in.v), LayoutdO{});
    Tensor sdOt = make_tensor(make_smem_ptr(in.v), LayoutdOt{});

    Tensor acc_s = partition_fragment_C(tiled_mma, Shape<Int<kBlockN>, Int<kBlockM>>{});
    Tensor acc_dp = partition_fragment_C(tiled_mma, Shape<Int<kBlockN>, Int<kBlockM>>{});
    clear(acc_s);
    clear(acc_dp);
    if constexpr (Traits::kARegs) {
      dev::gemm_rs(tiled_mma, acc_s, tSrK, tSrQ, thr_b.partition_S(sQ), copy_b, tidx);
      dev::gemm_rs(tiled_mma, acc_dp, tPrV, tPrdO, thr_b.partition_S(sdO), copy_b, tidx);
    } else {
      dev::gemm_ss(tiled_mma, acc_s, tSrK, tSrQ, tSsK, thr_b.partition_S(sQ), copy_a, copy_b, tidx);
      dev::gemm_ss(tiled_mma, acc_dp, tPrV, tPrdO, tPsV, thr_b.partition_S(sdO), copy_a, copy_b, tidx);
    }

    Tensor S = make_tensor(acc_s.data(), dev::rowcol_layout(acc_s.layout()));
    Tensor dP = make_tensor(acc_dp.data(), dev::rowcol_layout(acc_dp.layout()));
    float col_lse2[kCols], col_delta[kCols];
    CUTE_UNROLL
    for (int ni = 0; ni < kCols; ++ni) {
      const int col = int(get<1>(cS_rc(0, ni)));
      col_lse2[ni] = in.lse2[col];
      col_delta[ni] = in.delta[col];
    }
    // No mask for the query columns past N of a partial tile: their q, factor and dO rows and their lse2 and delta
    // were zero-filled, so S = 0, P = 1 and dS = 0 there, and P meets only the zero dO rows in dV += P^T dO.
    CUTE_UNROLL
    for (int mi = 0; mi < size<0>(S); ++mi) {
      CUTE_UNROLL
      for (int ni = 0; ni < kCols; ++ni) {
        const float pv = exp2f(S(mi, ni) * scale_log2 - col_lse2[ni]);
        dP(mi, ni) = pv * (dP(mi, ni) - col_delta[ni]);
        S(mi, ni) = pv;
      }
    }

    Tensor rP = dev::convert_fragment<Element>(acc_s);
    Tensor tPa = make_tensor(rP.data(), dev::acc_as_a_layout(rP.layout()));
    dev::gemm_rs(tiled_mma, acc_dv, tPa, tVrdOt, thr_bt.partition_S(sdOt), copy_bt, tidx);
    Tensor rdS = dev::convert_fragment<Element>(acc_dp);
    Tensor tdSa = make_tensor(rdS.data(), dev::acc_as_a_layout(rdS.layout()));
    dev::gemm_rs(tiled_mma, acc_dk, tdSa, tKrQt, thr_bt.partition_S(sQt), copy_bt, tidx);

    if (j == m_blocks - 1) {  // window done: dv, dk (and per-window dbias_k) out, those columns cleared
      Element* dv_base = static_cast<Element*>(p.dv) + (int64_t(b) * N * H + h) * D;
      Element* dk_base = static_cast<Element*>(p.dk) + (int64_t(b) * N * H + h) * D;
      store_rows(dV, cdv_rc, dv_base, out_row_stride, n0, N, D, 1.0f);
      store_rows(dK, cdk_rc, dk_base, out_row_stride, n0, N, D, p.scale);
      clear(acc_dv);
      clear_columns(dK, cdk_rc, D, false);
      if (p.bias_batched && R > 0) {
        store_factor_rows(dK, cdk_rc, p.dbk_part + (int64_t(b) * H + h) * N * R, n0, N, D, R, p.c_mult);
        clear_columns(dK, cdk_rc, D, true);
      }
    }
  }
  if (!p.bias_batched && R > 0 && steps > 0) {
    const int chunk = cta.b_begin / p.chunk_windows;
    store_factor_rows(dK, cdk_rc, p.dbk_part + (int64_t(chunk) * H + h) * N * R, n0, N, D, R, p.c_mult);
  }
}

// ---------------------------------------------------------------------------------------------------------------
// 4. dQ and dbias_q: query-stationary.

template <class Traits>
__global__ void __launch_bounds__(Traits::kNThreads, Traits::kMinBlocks) bwd_dq_kernel(const RfbiasBwdParams p) {
  using namespace cute;
  using Element = typename Traits::Element;
  constexpr int kBlockM = Traits::kBlockOuter;  // queries owned by the CTA
  constexpr int kBlockN = Traits::kBlockInner;  // keys per step
  constexpr int kDqk = Traits::kDqk;
  constexpr int kNThreads = Traits::kNThreads;
  constexpr int kStages = Traits::kStages;
  constexpr int kQKStride = Traits::kQKStride;
  constexpr int kVStride = Traits::kVStride;

  extern __shared__ uint4 smem_raw[];
  Element* outer_base = reinterpret_cast<Element*>(smem_raw);
  Element* inner_base = outer_base + 2 * Traits::kOuterSlot;

  const int tidx = threadIdx.x;
  const int N = p.N, D = p.D, R = p.R, H = p.H;
  const int m_blocks = (N + kBlockM - 1) / kBlockM;
  const int n_blocks = (N + kBlockN - 1) / kBlockN;
  const BwdCta cta(p, m_blocks);
  const int h = cta.h;
  const int m0 = cta.block * kBlockM;
  const int m_valid = min(kBlockM, N - m0);
  const int steps = (cta.b_end - cta.b_begin) * n_blocks;
  const int dist = prefetch_distance<kStages>(n_blocks);
  const bool vec16 = p.qkv_vec16;

  clear_smem<Traits::kSmemBytes, kNThreads>(smem_raw, tidx);
  __syncthreads();

  const FactorCopyPlan plan_bk(tidx, kNThreads, R, p.bias_vec2);
  const FactorCopyPlan plan_bq(tidx, kNThreads, R, p.bqs_vec2);
  const Element* bqs_head = static_cast<const Element*>(p.bq_scaled) + int64_t(h) * N * R;
  const int64_t bqs_batch = p.bias_batched ? int64_t(H) * N * R : 0;

  auto load_step = [&](const BwdStep& st) {
    const int w = st.w;
    const int j = st.j;
    const int b = cta.b_begin + w;
    if (j == 0) {  // the window's stationary tile: [q | bq_scaled], dO rows and their statistics
      Slot<Traits, kBlockM> o(outer_base + (w & 1) * Traits::kOuterSlot);
      const Element* gq = static_cast<const Element*>(p.q) + b * p.q_batch_stride + h * p.q_head_stride +
                          int64_t(m0) * p.q_row_stride;
      const Element* gdo = static_cast<const Element*>(p.dout) + b * p.do_batch_stride + h * p.do_head_stride +
                           int64_t(m0) * p.do_row_stride;
      copy_rows<Traits, kBlockM, kQKStride, Traits::kDv>(o.qk, gq, p.q_row_stride, m_valid, D, vec16, tidx);
      copy_rows<Traits, kBlockM, kVStride, Traits::kDv>(o.v, gdo, p.do_row_stride, m_valid, D, vec16, tidx);
      if (R > 0) {
        copy_factor_rows<kBlockM, kQKStride, true>(plan_bq, o.qk, D, bqs_head + b * bqs_batch + int64_t(m0) * R, R,
                                                   m_valid, p.bqs_vec2);
      }
      const int64_t stat0 = (int64_t(b) * H + h) * N + m0;
      copy_stats<kBlockM, kNThreads>(o.lse2, o.delta, p.lse2 + stat0, p.delta + stat0, m_valid, tidx);
    }
    const int n0 = (n_blocks - 1 - j) * kBlockN;
    const int valid = min(kBlockN, N - n0);
    Slot<Traits, kBlockN> in(inner_base + st.slot * Traits::kInnerSlot);
    const Element* gk = static_cast<const Element*>(p.k) + b * p.k_batch_stride + h * p.k_head_stride +
                        int64_t(n0) * p.k_row_stride;
    const Element* gv = static_cast<const Element*>(p.v) + b * p.v_batch_stride + h * p.v_head_stride +
                        int64_t(n0) * p.v_row_stride;
    copy_rows<Traits, kBlockN, kQKStride, Traits::kDv>(in.qk, gk, p.k_row_stride, valid, D, vec16, tidx);
    copy_rows<Traits, kBlockN, kVStride, Traits::kDv>(in.v, gv, p.v_row_stride, valid, D, vec16, tidx);
    if (R > 0) {
      const Element* gbk = static_cast<const Element*>(p.bias_k) + b * p.bk_batch_stride + h * p.bk_head_stride +
                           int64_t(n0) * p.bk_row_stride;
      copy_factor_rows<kBlockN, kQKStride, true>(plan_bk, in.qk, D, gbk, p.bk_row_stride, valid, p.bias_vec2);
    }
  };

  typename Traits::TiledMma tiled_mma;
  auto thr_mma = tiled_mma.get_thread_slice(tidx);
  using LayoutQo = typename Traits::template RowsQK<kBlockM>;
  using LayoutdOo = typename Traits::template RowsV<kBlockM>;
  using LayoutK = typename Traits::template RowsQK<kBlockN>;
  using LayoutKt = typename Traits::template RowsQKt<kBlockN>;
  using LayoutV = typename Traits::template RowsV<kBlockN>;

  Tensor tSrQ = thr_mma.partition_fragment_A(make_tensor(make_smem_ptr(outer_base), LayoutQo{}));   // S A
  Tensor tPrdO = thr_mma.partition_fragment_A(make_tensor(make_smem_ptr(outer_base), LayoutdOo{})); // dP A
  Tensor tSrK = thr_mma.partition_fragment_B(make_tensor(make_smem_ptr(inner_base), LayoutK{}));
  Tensor tPrV = thr_mma.partition_fragment_B(make_tensor(make_smem_ptr(inner_base), LayoutV{}));
  Tensor tQrKt = thr_mma.partition_fragment_B(make_tensor(make_smem_ptr(inner_base), LayoutKt{}));

  auto copy_a = make_tiled_copy_A(typename Traits::SmemCopyAtom{}, tiled_mma);
  auto copy_b = make_tiled_copy_B(typename Traits::SmemCopyAtom{}, tiled_mma);
  auto copy_bt = make_tiled_copy_B(typename Traits::SmemCopyAtomT{}, tiled_mma);
  auto thr_a = copy_a.get_thread_slice(tidx);
  auto thr_b = copy_b.get_thread_slice(tidx);
  auto thr_bt = copy_bt.get_thread_slice(tidx);

  Tensor acc_dq = partition_fragment_C(tiled_mma, Shape<Int<kBlockM>, Int<kDqk>>{});
  clear(acc_dq);
  Tensor dQ = make_tensor(acc_dq.data(), dev::rowcol_layout(acc_dq.layout()));
  Tensor cdq = thr_mma.partition_C(make_identity_tensor(Shape<Int<kBlockM>, Int<kDqk>>{}));
  Tensor cdq_rc = make_tensor(cdq.data(), dev::rowcol_layout(cdq.layout()));

  Tensor cS = thr_mma.partition_C(make_identity_tensor(Shape<Int<kBlockM>, Int<kBlockN>>{}));
  Tensor cS_rc = make_tensor(cS.data(), dev::rowcol_layout(cS.layout()));
  constexpr int kRows = decltype(size<0>(cS_rc))::value;
  float row_lse2[kRows], row_delta[kRows];

  const float scale_log2 = p.scale_log2;
  const int64_t out_row_stride = int64_t(H) * D;
  const int partial_limit = N - (n_blocks - 1) * kBlockN;  // valid keys of the first (last-index) tile

  BwdStep ld;  // the step being loaded: always `dist` steps ahead of `cur`
  for (int i = 0; i < dist; ++i) {
    if (ld.s < steps) load_step(ld);
    dev::cp_async_commit();
    ld.advance<kStages>(n_blocks);
  }

  for (BwdStep cur; cur.s < steps; cur.advance<kStages>(n_blocks)) {
    const int w = cur.w;
    const int j = cur.j;
    const int b = cta.b_begin + w;
    wait_ring<kStages>(dist);
    __syncthreads();
    if (ld.s < steps) load_step(ld);
    dev::cp_async_commit();
    ld.advance<kStages>(n_blocks);

    Slot<Traits, kBlockM> o(outer_base + (w & 1) * Traits::kOuterSlot);
    Tensor sQ = make_tensor(make_smem_ptr(o.qk), LayoutQo{});
    Tensor sdO = make_tensor(make_smem_ptr(o.v), LayoutdOo{});
    Tensor tSsQ = thr_a.partition_S(sQ);
    Tensor tPsdO = thr_a.partition_S(sdO);
    if (j == 0) {
      if (p.q_mult != 1.0f) scale_warp_rows<Traits>(o.qk, D, p.q_mult, tidx);
      if constexpr (Traits::kARegs) {
        cute::copy(copy_a, tSsQ, thr_a.retile_D(tSrQ));
        cute::copy(copy_a, tPsdO, thr_a.retile_D(tPrdO));
      }
      CUTE_UNROLL
      for (int mi = 0; mi < kRows; ++mi) {
        const int row = int(get<0>(cS_rc(mi, 0)));
        row_lse2[mi] = o.lse2[row];
        row_delta[mi] = o.delta[row];
      }
    }

    Slot<Traits, kBlockN> in(inner_base + cur.slot * Traits::kInnerSlot);
    Tensor sK = make_tensor(make_smem_ptr(in.qk), LayoutK{});
    Tensor sKt = make_tensor(make_smem_ptr(in.qk), LayoutKt{});
    Tensor sV = make_tensor(make_smem_ptr(in.v), LayoutV{});

    Tensor acc_s = partition_fragment_C(tiled_mma, Shape<Int<kBlockM>, Int<kBlockN>>{});
    Tensor acc_dp = partition_fragment_C(tiled_mma, Shape<Int<kBlockM>, Int<kBlockN>>{});
    clear(acc_s);
    clear(acc_dp);
    if constexpr (Traits::kARegs) {
      dev::gemm_rs(tiled_mma, acc_s, tSrQ, tSrK, thr_b.partition_S(sK), copy_b, tidx);
      dev::gemm_rs(tiled_mma, acc_dp, tPrdO, tPrV, thr_b.partition_S(sV), copy_b, tidx);
    } else {
      dev::gemm_ss(tiled_mma, acc_s, tSrQ, tSrK, tSsQ, thr_b.partition_S(sK), copy_a, copy_b, tidx);
      dev::gemm_ss(tiled_mma, acc_dp, tPrdO, tPrV, tPsdO, thr_b.partition_S(sV), copy_a, copy_b, tidx);
    }

    Tensor S = make_tensor(acc_s.data(), dev::rowcol_layout(acc_s.layout()));
    Tensor dP = make_tensor(acc_dp.data(), dev::rowcol_layout(acc_dp.layout()));
    const bool masked = j == 0 && partial_limit < kBlockN;
    CUTE_UNROLL
    for (int mi = 0; mi < kRows; ++mi) {
      CUTE_UNROLL
      for (int ni = 0; ni < size<1>(S); ++ni) {
        float ds = exp2f(S(mi, ni) * scale_log2 - row_lse2[mi]) * (dP(mi, ni) - row_delta[mi]);
        if (masked && int(get<1>(cS_rc(mi, ni))) >= partial_limit) ds = 0.f;
        dP(mi, ni) = ds;
      }
    }
    Tensor rdS = dev::convert_fragment<Element>(acc_dp);
    Tensor tdSa = make_tensor(rdS.data(), dev::acc_as_a_layout(rdS.layout()));
    dev::gemm_rs(tiled_mma, acc_dq, tdSa, tQrKt, thr_bt.partition_S(sKt), copy_bt, tidx);

    if (j == n_blocks - 1) {  // window done: dq (and per-window dbias_q) out, those columns cleared
      Element* dq_base = static_cast<Element*>(p.dq) + (int64_t(b) * N * H + h) * D;
      store_rows(dQ, cdq_rc, dq_base, out_row_stride, m0, N, D, p.scale);
      clear_columns(dQ, cdq_rc, D, false);
      if (p.bias_batched && R > 0) {
        store_factor_rows(dQ, cdq_rc, p.dbq_part + (int64_t(b) * H + h) * N * R, m0, N, D, R, 1.0f);
        clear_columns(dQ, cdq_rc, D, true);
      }
    }
  }
  if (!p.bias_batched && R > 0 && steps > 0) {
    const int chunk = cta.b_begin / p.chunk_windows;
    store_factor_rows(dQ, cdq_rc, p.dbq_part + (int64_t(chunk) * H + h) * N * R, m0, N, D, R, 1.0f);
  }
}

// ---------------------------------------------------------------------------------------------------------------
// 5. Factor gradients: fixed-order sum over chunks (shared factors) or a conversion (per-window factors).

template <typename Element>
__global__ void bwd_reduce_kernel(const RfbiasBwdParams p) {
  const int64_t hnr = int64_t(p.H) * p.N * p.R;
  const int64_t total = p.bias_batched ? hnr * p.B : hnr;
  Element* dbq = static_cast<Element*>(p.dbq);
  Element* dbk = static_cast<Element*>(p.dbk);
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    float aq, ak;
    if (p.bias_batched) {
      aq = p.dbq_part[i];
      ak = p.dbk_part[i];
    } else {
      aq = 0.f;
      ak = 0.f;
      for (int c = 0; c < p.n_chunks; ++c) {  // increasing chunk: the same order on every run
        aq += p.dbq_part[c * hnr + i];
        ak += p.dbk_part[c * hnr + i];
      }
    }
    dbq[i] = Element(aq);
    dbk[i] = Element(ak);
  }
}

}  // namespace sm80
}  // namespace rfsr
