// sm80 (mma.sync m16n8k16) backward kernels of flash_rfbias. Deterministic: no atomics anywhere.
//
// Four launches per call (see launch_bwd.h):
//   1. bwd_delta_kernel      delta[b, h, n] = rowsum(dO o out) in fp32.
//   2. bwd_dkdv_kernel       key-stationary: one CTA per (key block, b, h) walks every query block and keeps
//                            dV and dKcat = [dK | dbias_k] in registers; writes dk, dv and the per-window
//                            dbias_k rows (fp32 workspace) with plain stores, one writer per element.
//   3. bwd_dq_kernel         query-stationary: one CTA per (query block, b, h) walks every key block and keeps
//                            dQcat = [dQ | dbias_q] in registers; writes dq and the per-window dbias_q rows.
//   4. bwd_reduce_kernel     dbias = sum over b of the per-window rows (shared factors), in increasing b, or a
//                            plain conversion (per-window factors); fp32 -> input dtype.
//
// Kernels 2 and 3 both recompute the scores. Kernel 2 works on the transposed problem so that every operand of
// its second-stage GEMMs is either a register accumulator (P^T, dS^T) or a transposed shared-memory read:
//   S^T  = Kcat . Qcat^T        (keys x queries)        P^T  = exp2(S^T * scale_log2 - lse2[query])
//   dP^T = V . dO^T                                      dS^T = P^T o (dP^T - delta[query])
//   dV  += P^T . dO              dKcat += dS^T . Qcat
// Kernel 3 is the forward orientation:
//   S = Qcat . Kcat^T, dP = dO . V^T, dS = P o (dP - delta), dQcat += dS . Kcat.
// Packed rows are staged exactly as in the forward: [q * q_mult | bias_q * bq_mult | 0] and [k | bias_k | 0];
// padding columns and rows past N are zero.
#pragma once

#include <cmath>
#include <cstdint>

#include "../params_bwd.h"
#include "../common/utils.h"

#include <cute/tensor.hpp>
#include <cute/atom/mma_atom.hpp>
#include <cute/atom/copy_atom.hpp>
#include <cutlass/numeric_types.h>
#include <cutlass/numeric_conversion.h>

namespace rfsr {
namespace sm80 {

template <typename Element_, int kDqk_, int kDv_>
struct BwdTraitsSm80 {
  using Element = Element_;
  static constexpr int kDqk = kDqk_;
  static constexpr int kDv = kDv_;
  static constexpr int kNWarps = 4;
  static constexpr int kNThreads = 32 * kNWarps;
  static constexpr bool kWide = kDqk + kDv > 192;
  // Outer (stationary) tiles own 16 rows per warp; inner tiles are smaller for wide buckets (register budget).
  static constexpr int kBlockOuter = 16 * kNWarps;  // keys in the dK/dV kernel, queries in the dQ kernel
  static constexpr int kBlockInner = kWide ? 32 : 64;

  static_assert(kDqk % 16 == 0 && kDv % 16 == 0 && kDv <= kDqk, "bad head-dim bucket");

  // Rows padded by 8 elements (16 bytes): conflict-free ldmatrix, and any 4-byte column offset addressable.
  static constexpr int kQKStride = kDqk + 8;
  static constexpr int kVStride = kDv + 8;

  using MmaOp = std::conditional_t<std::is_same_v<Element, cutlass::half_t>, cute::SM80_16x8x16_F32F16F16F32_TN,
                                   cute::SM80_16x8x16_F32BF16BF16F32_TN>;
  using TiledMma = cute::TiledMMA<cute::MMA_Atom<MmaOp>,
                                  cute::Layout<cute::Shape<cute::Int<kNWarps>, cute::_1, cute::_1>>,
                                  cute::Tile<cute::Int<16 * kNWarps>, cute::_16, cute::_16>>;
  using SmemCopyAtom = cute::Copy_Atom<cute::SM75_U32x4_LDSM_N, Element>;
  using SmemCopyAtomT = cute::Copy_Atom<cute::SM75_U16x8_LDSM_T, Element>;

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

  // Shared memory (elements of Element): outer QK + outer V + inner QK + inner V tiles, then 2 float rows.
  static constexpr int kSmemOuterQK = kBlockOuter * kQKStride;
  static constexpr int kSmemOuterV = kBlockOuter * kVStride;
  static constexpr int kSmemInnerQK = kBlockInner * kQKStride;
  static constexpr int kSmemInnerV = kBlockInner * kVStride;
  static constexpr int kSmemElems = kSmemOuterQK + kSmemOuterV + kSmemInnerQK + kSmemInnerV;
  static_assert(kSmemElems % 8 == 0, "tiles must keep 16-byte alignment");
  static constexpr int kSmemBytes = kSmemElems * int(sizeof(Element)) + 2 * kBlockInner * int(sizeof(float));
};

// ---------------------------------------------------------------------------------------------------------------
// Synchronous staging loads (global -> registers -> shared). Rows at or past valid_rows are written as zero.

// Columns [0, D) of kRows rows; D <= kWidth, D even. Optionally multiplied by `mult` (rounded once).
template <typename Element, int kThreads, int kRows, int kSStride, int kWidth>
__device__ __forceinline__ void stage_rows(Element* s, const Element* g, int64_t g_row_stride, int valid_rows,
                                           int D, bool vec16, float mult, int tidx) {
  const bool scaled = mult != 1.0f;
  if (vec16) {
    constexpr int kChunks = kWidth / 8;
    for (int i = tidx; i < kRows * kChunks; i += kThreads) {
      const int r = i / kChunks, c = (i - r * kChunks) * 8;
      if (c < D) {
        uint4 w = make_uint4(0, 0, 0, 0);
        if (r < valid_rows) {
          w = *reinterpret_cast<const uint4*>(g + r * g_row_stride + c);
          if (scaled) {
            w.x = dev::Pack2<Element>::scale(w.x, mult);
            w.y = dev::Pack2<Element>::scale(w.y, mult);
            w.z = dev::Pack2<Element>::scale(w.z, mult);
            w.w = dev::Pack2<Element>::scale(w.w, mult);
          }
        }
        *reinterpret_cast<uint4*>(s + r * kSStride + c) = w;
      }
    }
  } else {
    constexpr int kWords = kWidth / 2;
    for (int i = tidx; i < kRows * kWords; i += kThreads) {
      const int r = i / kWords, c = (i - r * kWords) * 2;
      if (c < D) {
        uint32_t w = 0;
        if (r < valid_rows) {
          w = *reinterpret_cast<const uint32_t*>(g + r * g_row_stride + c);
          if (scaled) w = dev::Pack2<Element>::scale(w, mult);
        }
        *reinterpret_cast<uint32_t*>(s + r * kSStride + c) = w;
      }
    }
  }
}

// Factor rows (R elements) into columns [col0, col0 + R), multiplied by `mult` when it is not 1.
template <typename Element, int kThreads, int kRows, int kSStride>
__device__ __forceinline__ void stage_factor_rows(Element* s, int col0, const Element* g, int64_t g_row_stride,
                                                  int valid_rows, int R, bool vec2, float mult, int tidx) {
  if (R <= 0) return;
  const bool scaled = mult != 1.0f;
  if (vec2) {
    const int words = R >> 1;
    for (int i = tidx; i < kRows * words; i += kThreads) {
      const int r = i / words, c = (i - r * words) * 2;
      uint32_t w = 0;
      if (r < valid_rows) {
        w = *reinterpret_cast<const uint32_t*>(g + r * g_row_stride + c);
        if (scaled) w = dev::Pack2<Element>::scale(w, mult);
      }
      *reinterpret_cast<uint32_t*>(s + r * kSStride + col0 + c) = w;
    }
  } else {
    for (int i = tidx; i < kRows * R; i += kThreads) {
      const int r = i / R, c = i - r * R;
      uint16_t w = 0;
      if (r < valid_rows) {
        w = *reinterpret_cast<const uint16_t*>(g + r * g_row_stride + c);
        if (scaled) w = dev::Pack2<Element>::scale1(w, mult);
      }
      *reinterpret_cast<uint16_t*>(s + r * kSStride + col0 + c) = w;
    }
  }
}

template <class Traits, int kRows>
__device__ __forceinline__ void stage_qcat(typename Traits::Element* s, const RfbiasBwdParams& p, int b, int h,
                                           int row0, int tidx) {
  using Element = typename Traits::Element;
  const int valid = min(kRows, p.N - row0);
  const Element* gq = static_cast<const Element*>(p.q) + b * p.q_batch_stride + h * p.q_head_stride +
                      int64_t(row0) * p.q_row_stride;
  stage_rows<Element, Traits::kNThreads, kRows, Traits::kQKStride, Traits::kDv>(
      s, gq, p.q_row_stride, valid, p.D, p.qkv_vec16, p.q_mult, tidx);
  const Element* gb = static_cast<const Element*>(p.bias_q) + b * p.bq_batch_stride + h * p.bq_head_stride +
                      int64_t(row0) * p.bq_row_stride;
  stage_factor_rows<Element, Traits::kNThreads, kRows, Traits::kQKStride>(s, p.D, gb, p.bq_row_stride, valid, p.R,
                                                                          p.bias_vec2, p.bq_mult, tidx);
}

template <class Traits, int kRows>
__device__ __forceinline__ void stage_kcat(typename Traits::Element* s, const RfbiasBwdParams& p, int b, int h,
                                           int row0, int tidx) {
  using Element = typename Traits::Element;
  const int valid = min(kRows, p.N - row0);
  const Element* gk = static_cast<const Element*>(p.k) + b * p.k_batch_stride + h * p.k_head_stride +
                      int64_t(row0) * p.k_row_stride;
  stage_rows<Element, Traits::kNThreads, kRows, Traits::kQKStride, Traits::kDv>(
      s, gk, p.k_row_stride, valid, p.D, p.qkv_vec16, 1.0f, tidx);
  const Element* gb = static_cast<const Element*>(p.bias_k) + b * p.bk_batch_stride + h * p.bk_head_stride +
                      int64_t(row0) * p.bk_row_stride;
  stage_factor_rows<Element, Traits::kNThreads, kRows, Traits::kQKStride>(s, p.D, gb, p.bk_row_stride, valid, p.R,
                                                                          p.bias_vec2, 1.0f, tidx);
}

template <class Traits, int kRows>
__device__ __forceinline__ void stage_v_rows(typename Traits::Element* s, const void* base, int64_t batch_stride,
                                             int64_t head_stride, int64_t row_stride, const RfbiasBwdParams& p,
                                             int b, int h, int row0, int tidx) {
  using Element = typename Traits::Element;
  const int valid = min(kRows, p.N - row0);
  const Element* g = static_cast<const Element*>(base) + b * batch_stride + h * head_stride +
                     int64_t(row0) * row_stride;
  stage_rows<Element, Traits::kNThreads, kRows, Traits::kVStride, Traits::kDv>(s, g, row_stride, valid, p.D,
                                                                               p.qkv_vec16, 1.0f, tidx);
}

__device__ __forceinline__ void zero_smem(uint4* smem, int bytes, int tidx, int nthreads) {
  for (int i = tidx; i < bytes / 16; i += nthreads) smem[i] = make_uint4(0, 0, 0, 0);
}

// Stores a pair of fp32 values as two adjacent elements (4-byte aligned since D and col are even).
template <typename Element>
__device__ __forceinline__ void store_pair(Element* dst, float a, float b) {
  cutlass::Array<float, 2> f;
  f[0] = a;
  f[1] = b;
  cutlass::NumericArrayConverter<Element, float, 2> conv;
  *reinterpret_cast<cutlass::Array<Element, 2>*>(dst) = conv(f);
}

// ---------------------------------------------------------------------------------------------------------------
// 1. delta = rowsum(dO o out), fp32, one thread per (b, h, n) row.

template <typename Element>
__global__ void bwd_delta_kernel(const RfbiasBwdParams p) {
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
  }
}

// ---------------------------------------------------------------------------------------------------------------
// 2. dK, dV, per-window dbias_k: key-stationary.

template <class Traits>
__global__ void __launch_bounds__(Traits::kNThreads) bwd_dkdv_kernel(const RfbiasBwdParams p) {
  using namespace cute;
  using Element = typename Traits::Element;
  constexpr int kBlockN = Traits::kBlockOuter;  // keys owned by the CTA
  constexpr int kBlockM = Traits::kBlockInner;  // queries per step
  constexpr int kDqk = Traits::kDqk;
  constexpr int kDv = Traits::kDv;
  constexpr int kNThreads = Traits::kNThreads;
  constexpr float kLog2e = 1.4426950408889634f;

  extern __shared__ uint4 smem_raw[];
  Element* sK_ptr = reinterpret_cast<Element*>(smem_raw);
  Element* sV_ptr = sK_ptr + Traits::kSmemOuterQK;
  Element* sQ_ptr = sV_ptr + Traits::kSmemOuterV;
  Element* sdO_ptr = sQ_ptr + Traits::kSmemInnerQK;
  float* sLse = reinterpret_cast<float*>(sdO_ptr + Traits::kSmemInnerV);
  float* sDelta = sLse + kBlockM;

  const int tidx = threadIdx.x;
  const int N = p.N, D = p.D, R = p.R;
  const int n_blocks = (N + kBlockN - 1) / kBlockN;
  const int64_t bid = blockIdx.x;
  const int n_block = int(bid % n_blocks);
  const int64_t hb = bid / n_blocks;
  const int b = int(hb % p.B);
  const int h = int(hb / p.B);
  const int n0 = n_block * kBlockN;

  zero_smem(smem_raw, Traits::kSmemBytes, tidx, kNThreads);
  __syncthreads();
  stage_kcat<Traits, kBlockN>(sK_ptr, p, b, h, n0, tidx);
  stage_v_rows<Traits, kBlockN>(sV_ptr, p.v, p.v_batch_stride, p.v_head_stride, p.v_row_stride, p, b, h, n0, tidx);

  typename Traits::TiledMma tiled_mma;
  auto thr_mma = tiled_mma.get_thread_slice(tidx);
  Tensor sK = make_tensor(make_smem_ptr(sK_ptr), typename Traits::template RowsQK<kBlockN>{});
  Tensor sV = make_tensor(make_smem_ptr(sV_ptr), typename Traits::template RowsV<kBlockN>{});
  Tensor sQ = make_tensor(make_smem_ptr(sQ_ptr), typename Traits::template RowsQK<kBlockM>{});
  Tensor sQt = make_tensor(make_smem_ptr(sQ_ptr), typename Traits::template RowsQKt<kBlockM>{});
  Tensor sdO = make_tensor(make_smem_ptr(sdO_ptr), typename Traits::template RowsV<kBlockM>{});
  Tensor sdOt = make_tensor(make_smem_ptr(sdO_ptr), typename Traits::template RowsVt<kBlockM>{});

  Tensor tSrK = thr_mma.partition_fragment_A(sK);     // S^T  A: keys x Dqk
  Tensor tSrQ = thr_mma.partition_fragment_B(sQ);     // S^T  B: queries x Dqk
  Tensor tPrV = thr_mma.partition_fragment_A(sV);     // dP^T A: keys x Dv
  Tensor tPrdO = thr_mma.partition_fragment_B(sdO);   // dP^T B: queries x Dv
  Tensor tVrdOt = thr_mma.partition_fragment_B(sdOt); // dV   B: Dv x queries
  Tensor tKrQt = thr_mma.partition_fragment_B(sQt);   // dK   B: Dqk x queries

  auto copy_a = make_tiled_copy_A(typename Traits::SmemCopyAtom{}, tiled_mma);
  auto copy_b = make_tiled_copy_B(typename Traits::SmemCopyAtom{}, tiled_mma);
  auto copy_bt = make_tiled_copy_B(typename Traits::SmemCopyAtomT{}, tiled_mma);
  Tensor tSsK = copy_a.get_thread_slice(tidx).partition_S(sK);
  Tensor tSsQ = copy_b.get_thread_slice(tidx).partition_S(sQ);
  Tensor tPsV = copy_a.get_thread_slice(tidx).partition_S(sV);
  Tensor tPsdO = copy_b.get_thread_slice(tidx).partition_S(sdO);
  Tensor tVsdOt = copy_bt.get_thread_slice(tidx).partition_S(sdOt);
  Tensor tKsQt = copy_bt.get_thread_slice(tidx).partition_S(sQt);

  Tensor acc_dv = partition_fragment_C(tiled_mma, Shape<Int<kBlockN>, Int<kDv>>{});
  Tensor acc_dk = partition_fragment_C(tiled_mma, Shape<Int<kBlockN>, Int<kDqk>>{});
  clear(acc_dv);
  clear(acc_dk);

  Tensor cS = make_identity_tensor(Shape<Int<kBlockN>, Int<kBlockM>>{});
  Tensor tScS = thr_mma.partition_C(cS);
  Tensor tScS_rc = make_tensor(tScS.data(), dev::rowcol_layout(tScS.layout()));

  const float scale_log2 = p.scale_log2;
  const float* lse_bh = p.lse + (int64_t(b) * p.H + h) * N;
  const float* delta_bh = p.delta + (int64_t(b) * p.H + h) * N;
  const int m_blocks = (N + kBlockM - 1) / kBlockM;

  for (int m_block = 0; m_block < m_blocks; ++m_block) {
    const int m0 = m_block * kBlockM;
    __syncthreads();  // everybody is done with the previous query tile
    stage_qcat<Traits, kBlockM>(sQ_ptr, p, b, h, m0, tidx);
    stage_v_rows<Traits, kBlockM>(sdO_ptr, p.dout, p.do_batch_stride, p.do_head_stride, p.do_row_stride, p, b, h,
                                  m0, tidx);
    for (int i = tidx; i < kBlockM; i += kNThreads) {
      const bool ok = m0 + i < N;
      sLse[i] = ok ? lse_bh[m0 + i] * kLog2e : INFINITY;  // rows past N: P = 0
      sDelta[i] = ok ? delta_bh[m0 + i] : 0.f;
    }
    __syncthreads();

    Tensor acc_s = partition_fragment_C(tiled_mma, Shape<Int<kBlockN>, Int<kBlockM>>{});
    Tensor acc_dp = partition_fragment_C(tiled_mma, Shape<Int<kBlockN>, Int<kBlockM>>{});
    clear(acc_s);
    clear(acc_dp);
    dev::gemm_ss(tiled_mma, acc_s, tSrK, tSrQ, tSsK, tSsQ, copy_a, copy_b, tidx);
    dev::gemm_ss(tiled_mma, acc_dp, tPrV, tPrdO, tPsV, tPsdO, copy_a, copy_b, tidx);

    Tensor S = make_tensor(acc_s.data(), dev::rowcol_layout(acc_s.layout()));
    Tensor dP = make_tensor(acc_dp.data(), dev::rowcol_layout(acc_dp.layout()));
    CUTE_UNROLL
    for (int mi = 0; mi < size<0>(S); ++mi) {
      CUTE_UNROLL
      for (int ni = 0; ni < size<1>(S); ++ni) {
        const int col = int(get<1>(tScS_rc(mi, ni)));
        const float pv = exp2f(S(mi, ni) * scale_log2 - sLse[col]);
        S(mi, ni) = pv;
        dP(mi, ni) = pv * (dP(mi, ni) - sDelta[col]);
      }
    }

    Tensor rP = dev::convert_fragment<Element>(acc_s);
    Tensor tPa = make_tensor(rP.data(), dev::acc_as_a_layout(rP.layout()));
    dev::gemm_rs(tiled_mma, acc_dv, tPa, tVrdOt, tVsdOt, copy_bt, tidx);
    Tensor rdS = dev::convert_fragment<Element>(acc_dp);
    Tensor tdSa = make_tensor(rdS.data(), dev::acc_as_a_layout(rdS.layout()));
    dev::gemm_rs(tiled_mma, acc_dk, tdSa, tKrQt, tKsQt, copy_bt, tidx);
  }

  // Epilogue: dv, dk (B, N, H, D) contiguous; dbias_k rows of this window into the fp32 workspace.
  const float c_mult = p.c_mult;
  Element* dv_base = static_cast<Element*>(p.dv) + (int64_t(b) * N * p.H + h) * D;
  Element* dk_base = static_cast<Element*>(p.dk) + (int64_t(b) * N * p.H + h) * D;
  const int64_t out_row_stride = int64_t(p.H) * D;
  {
    Tensor O = make_tensor(acc_dv.data(), dev::rowcol_layout(acc_dv.layout()));
    Tensor c = thr_mma.partition_C(make_identity_tensor(Shape<Int<kBlockN>, Int<kDv>>{}));
    Tensor c_rc = make_tensor(c.data(), dev::rowcol_layout(c.layout()));
    CUTE_UNROLL
    for (int mi = 0; mi < size<0>(O); ++mi) {
      const int row = n0 + int(get<0>(c_rc(mi, 0)));
      if (row >= N) continue;
      CUTE_UNROLL
      for (int nj = 0; nj < size<1>(O) / 2; ++nj) {
        const int col = int(get<1>(c_rc(mi, 2 * nj)));
        if (col < D) store_pair(dv_base + row * out_row_stride + col, O(mi, 2 * nj), O(mi, 2 * nj + 1));
      }
    }
  }
  {
    Tensor O = make_tensor(acc_dk.data(), dev::rowcol_layout(acc_dk.layout()));
    Tensor c = thr_mma.partition_C(make_identity_tensor(Shape<Int<kBlockN>, Int<kDqk>>{}));
    Tensor c_rc = make_tensor(c.data(), dev::rowcol_layout(c.layout()));
    float* dbk_rows = p.dbk_part + (int64_t(b) * p.H + h) * N * R;
    CUTE_UNROLL
    for (int mi = 0; mi < size<0>(O); ++mi) {
      const int row = n0 + int(get<0>(c_rc(mi, 0)));
      if (row >= N) continue;
      CUTE_UNROLL
      for (int nj = 0; nj < size<1>(O) / 2; ++nj) {
        const int col = int(get<1>(c_rc(mi, 2 * nj)));
        const float a0 = O(mi, 2 * nj) * c_mult, a1 = O(mi, 2 * nj + 1) * c_mult;
        if (col < D) {
          store_pair(dk_base + row * out_row_stride + col, a0, a1);
        } else {
          const int r = col - D;
          if (r < R) dbk_rows[int64_t(row) * R + r] = a0;
          if (r + 1 < R) dbk_rows[int64_t(row) * R + r + 1] = a1;
        }
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------------------------
// 3. dQ and per-window dbias_q: query-stationary.

template <class Traits>
__global__ void __launch_bounds__(Traits::kNThreads) bwd_dq_kernel(const RfbiasBwdParams p) {
  using namespace cute;
  using Element = typename Traits::Element;
  constexpr int kBlockM = Traits::kBlockOuter;  // queries owned by the CTA
  constexpr int kBlockN = Traits::kBlockInner;  // keys per step
  constexpr int kDqk = Traits::kDqk;
  constexpr int kNThreads = Traits::kNThreads;
  constexpr float kLog2e = 1.4426950408889634f;

  extern __shared__ uint4 smem_raw[];
  Element* sQ_ptr = reinterpret_cast<Element*>(smem_raw);
  Element* sdO_ptr = sQ_ptr + Traits::kSmemOuterQK;
  Element* sK_ptr = sdO_ptr + Traits::kSmemOuterV;
  Element* sV_ptr = sK_ptr + Traits::kSmemInnerQK;

  const int tidx = threadIdx.x;
  const int N = p.N, D = p.D, R = p.R;
  const int m_blocks = (N + kBlockM - 1) / kBlockM;
  const int64_t bid = blockIdx.x;
  const int m_block = int(bid % m_blocks);
  const int64_t hb = bid / m_blocks;
  const int b = int(hb % p.B);
  const int h = int(hb / p.B);
  const int m0 = m_block * kBlockM;

  zero_smem(smem_raw, Traits::kSmemBytes, tidx, kNThreads);
  __syncthreads();
  stage_qcat<Traits, kBlockM>(sQ_ptr, p, b, h, m0, tidx);
  stage_v_rows<Traits, kBlockM>(sdO_ptr, p.dout, p.do_batch_stride, p.do_head_stride, p.do_row_stride, p, b, h, m0,
                                tidx);

  typename Traits::TiledMma tiled_mma;
  auto thr_mma = tiled_mma.get_thread_slice(tidx);
  Tensor sQ = make_tensor(make_smem_ptr(sQ_ptr), typename Traits::template RowsQK<kBlockM>{});
  Tensor sdO = make_tensor(make_smem_ptr(sdO_ptr), typename Traits::template RowsV<kBlockM>{});
  Tensor sK = make_tensor(make_smem_ptr(sK_ptr), typename Traits::template RowsQK<kBlockN>{});
  Tensor sKt = make_tensor(make_smem_ptr(sK_ptr), typename Traits::template RowsQKt<kBlockN>{});
  Tensor sV = make_tensor(make_smem_ptr(sV_ptr), typename Traits::template RowsV<kBlockN>{});

  Tensor tSrQ = thr_mma.partition_fragment_A(sQ);    // S  A: queries x Dqk
  Tensor tSrK = thr_mma.partition_fragment_B(sK);    // S  B: keys x Dqk
  Tensor tPrdO = thr_mma.partition_fragment_A(sdO);  // dP A: queries x Dv
  Tensor tPrV = thr_mma.partition_fragment_B(sV);    // dP B: keys x Dv
  Tensor tQrKt = thr_mma.partition_fragment_B(sKt);  // dQ B: Dqk x keys

  auto copy_a = make_tiled_copy_A(typename Traits::SmemCopyAtom{}, tiled_mma);
  auto copy_b = make_tiled_copy_B(typename Traits::SmemCopyAtom{}, tiled_mma);
  auto copy_bt = make_tiled_copy_B(typename Traits::SmemCopyAtomT{}, tiled_mma);
  Tensor tSsQ = copy_a.get_thread_slice(tidx).partition_S(sQ);
  Tensor tSsK = copy_b.get_thread_slice(tidx).partition_S(sK);
  Tensor tPsdO = copy_a.get_thread_slice(tidx).partition_S(sdO);
  Tensor tPsV = copy_b.get_thread_slice(tidx).partition_S(sV);
  Tensor tQsKt = copy_bt.get_thread_slice(tidx).partition_S(sKt);

  Tensor acc_dq = partition_fragment_C(tiled_mma, Shape<Int<kBlockM>, Int<kDqk>>{});
  clear(acc_dq);

  Tensor cS = make_identity_tensor(Shape<Int<kBlockM>, Int<kBlockN>>{});
  Tensor tScS = thr_mma.partition_C(cS);
  Tensor tScS_rc = make_tensor(tScS.data(), dev::rowcol_layout(tScS.layout()));

  // Per-row statistics of this thread's rows.
  constexpr int kRows = decltype(size<0>(dev::rowcol_layout(tScS.layout())))::value;
  float lse2[kRows], delta[kRows];
  {
    const float* lse_bh = p.lse + (int64_t(b) * p.H + h) * N;
    const float* delta_bh = p.delta + (int64_t(b) * p.H + h) * N;
    CUTE_UNROLL
    for (int mi = 0; mi < kRows; ++mi) {
      const int row = m0 + int(get<0>(tScS_rc(mi, 0)));
      const bool ok = row < N;
      lse2[mi] = ok ? lse_bh[row] * kLog2e : INFINITY;
      delta[mi] = ok ? delta_bh[row] : 0.f;
    }
  }

  const float scale_log2 = p.scale_log2;
  const int n_blocks = (N + kBlockN - 1) / kBlockN;
  for (int n_block = 0; n_block < n_blocks; ++n_block) {
    const int n0 = n_block * kBlockN;
    __syncthreads();  // everybody is done with the previous key tile
    stage_kcat<Traits, kBlockN>(sK_ptr, p, b, h, n0, tidx);
    stage_v_rows<Traits, kBlockN>(sV_ptr, p.v, p.v_batch_stride, p.v_head_stride, p.v_row_stride, p, b, h, n0,
                                  tidx);
    __syncthreads();

    Tensor acc_s = partition_fragment_C(tiled_mma, Shape<Int<kBlockM>, Int<kBlockN>>{});
    Tensor acc_dp = partition_fragment_C(tiled_mma, Shape<Int<kBlockM>, Int<kBlockN>>{});
    clear(acc_s);
    clear(acc_dp);
    dev::gemm_ss(tiled_mma, acc_s, tSrQ, tSrK, tSsQ, tSsK, copy_a, copy_b, tidx);
    dev::gemm_ss(tiled_mma, acc_dp, tPrdO, tPrV, tPsdO, tPsV, copy_a, copy_b, tidx);

    Tensor S = make_tensor(acc_s.data(), dev::rowcol_layout(acc_s.layout()));
    Tensor dP = make_tensor(acc_dp.data(), dev::rowcol_layout(acc_dp.layout()));
    const int limit = N - n0;
    CUTE_UNROLL
    for (int mi = 0; mi < size<0>(S); ++mi) {
      CUTE_UNROLL
      for (int ni = 0; ni < size<1>(S); ++ni) {
        const int col = int(get<1>(tScS_rc(mi, ni)));
        const float pv = col < limit ? exp2f(S(mi, ni) * scale_log2 - lse2[mi]) : 0.f;
        dP(mi, ni) = pv * (dP(mi, ni) - delta[mi]);
      }
    }
    Tensor rdS = dev::convert_fragment<Element>(acc_dp);
    Tensor tdSa = make_tensor(rdS.data(), dev::acc_as_a_layout(rdS.layout()));
    dev::gemm_rs(tiled_mma, acc_dq, tdSa, tQrKt, tQsKt, copy_bt, tidx);
  }

  // Epilogue: dq = scale * dQcat[:, :D] (B, N, H, D) contiguous; dbias_q rows = dQcat[:, D:D+R] (fp32 workspace).
  const float scale = p.scale;
  Element* dq_base = static_cast<Element*>(p.dq) + (int64_t(b) * N * p.H + h) * D;
  const int64_t out_row_stride = int64_t(p.H) * D;
  float* dbq_rows = p.dbq_part + (int64_t(b) * p.H + h) * N * R;
  Tensor O = make_tensor(acc_dq.data(), dev::rowcol_layout(acc_dq.layout()));
  Tensor c = thr_mma.partition_C(make_identity_tensor(Shape<Int<kBlockM>, Int<kDqk>>{}));
  Tensor c_rc = make_tensor(c.data(), dev::rowcol_layout(c.layout()));
  CUTE_UNROLL
  for (int mi = 0; mi < size<0>(O); ++mi) {
    const int row = m0 + int(get<0>(c_rc(mi, 0)));
    if (row >= N) continue;
    CUTE_UNROLL
    for (int nj = 0; nj < size<1>(O) / 2; ++nj) {
      const int col = int(get<1>(c_rc(mi, 2 * nj)));
      if (col < D) {
        store_pair(dq_base + row * out_row_stride + col, O(mi, 2 * nj) * scale, O(mi, 2 * nj + 1) * scale);
      } else {
        const int r = col - D;
        if (r < R) dbq_rows[int64_t(row) * R + r] = O(mi, 2 * nj);
        if (r + 1 < R) dbq_rows[int64_t(row) * R + r + 1] = O(mi, 2 * nj + 1);
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------------------------
// 4. Factor gradients: fixed-order sum over windows (shared factors) or a conversion (per-window factors).

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
      for (int b = 0; b < p.B; ++b) {  // increasing b: the same order on every run
        aq += p.dbq_part[b * hnr + i];
        ak += p.dbk_part[b * hnr + i];
      }
    }
    dbq[i] = Element(aq);
    dbk[i] = Element(ak);
  }
}

}  // namespace sm80
}  // namespace rfsr
