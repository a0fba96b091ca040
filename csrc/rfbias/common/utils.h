// Small device helpers shared by the rfbias kernels: asynchronous copies, register-layout views, the two GEMM
// shapes of the sm80 kernels, quad reductions and 16-bit stores. CuTe/CUTLASS only, no torch.
#pragma once

#include <cstdint>
#include <cuda_fp16.h>
#include <cuda_bf16.h>

#include <cute/tensor.hpp>
#include <cutlass/numeric_types.h>
#include <cutlass/numeric_conversion.h>

namespace rfsr {
namespace dev {

// ---------------------------------------------------------------------------------------------------------------
// cp.async with a source size: bytes past src_bytes are written as zero (src_bytes == 0 zero-fills the slot).

__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

__device__ __forceinline__ void cp_async_16(void* smem, const void* gmem, bool valid) {
  int n = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_u32(smem)), "l"(gmem), "r"(n));
}

__device__ __forceinline__ void cp_async_4(void* smem, const void* gmem, bool valid) {
  int n = valid ? 4 : 0;
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(smem_u32(smem)), "l"(gmem), "r"(n));
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }

template <int N>
__device__ __forceinline__ void cp_async_wait() {
  // "memory": shared-memory reads after the wait must not be moved above it
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

// ---------------------------------------------------------------------------------------------------------------
// Register-layout views of an MMA accumulator (SM80 m16n8 atoms, value mode (2, 2) = (column pair, row half)).

// ((2, 2), MMA_M, MMA_N) -> ((2, MMA_M), (2, MMA_N)): rows first, columns second.
template <class L>
__device__ __forceinline__ auto rowcol_layout(L const& l) {
  using namespace cute;
  static_assert(decltype(rank(l))::value == 3, "accumulator layout must be rank 3");
  return make_layout(make_layout(get<0, 1>(l), get<1>(l)), make_layout(get<0, 0>(l), get<2>(l)));
}

// ((2, 2), MMA_M, MMA_N) -> ((4, 2), MMA_M, MMA_N / 2): two neighbouring n8 accumulator atoms form the
// k16 A-operand fragment of the next m16n8k16 MMA (so P never leaves registers).
template <class L>
__device__ __forceinline__ auto acc_as_a_layout(L const& l) {
  using namespace cute;
  static_assert(decltype(size<0>(l))::value == 4, "expects m16n8 accumulator atoms");
  static_assert(decltype(size<2>(l))::value % 2 == 0, "needs an even number of n8 atoms");
  auto d = logical_divide(l, Shape<Underscore, Underscore, _2>{});  // (4, MMA_M, (2, MMA_N/2))
  return make_layout(make_layout(get<0>(d), get<2, 0>(d)), get<1>(d), get<2, 1>(d));
}

// Register tensor of another element type with the same (compact) layout, converted in one array pass.
template <typename To, class Engine, class Layout>
__device__ __forceinline__ auto convert_fragment(cute::Tensor<Engine, Layout> const& in) {
  using From = typename Engine::value_type;
  constexpr int kN = decltype(cute::size(in))::value;
  auto out = cute::make_tensor<To>(in.layout());
  cutlass::NumericArrayConverter<To, From, kN> conv;
  *reinterpret_cast<cutlass::Array<To, kN>*>(out.data()) =
      conv(*reinterpret_cast<const cutlass::Array<From, kN>*>(in.data()));
  return out;
}

// ---------------------------------------------------------------------------------------------------------------
// GEMMs. Both operands from shared memory (S = Q K^T), or A from registers (O += P V).

template <class TiledMma, class Acc, class RA, class RB, class SA, class SB, class CopyA, class CopyB>
__device__ __forceinline__ void gemm_ss(TiledMma& mma, Acc& acc, RA& tCrA, RB& tCrB, SA const& tCsA,
                                        SB const& tCsB, CopyA const& copy_a, CopyB const& copy_b, int tidx) {
  using namespace cute;
  auto thr_a = copy_a.get_thread_slice(tidx);
  auto thr_b = copy_b.get_thread_slice(tidx);
  auto tCrA_v = thr_a.retile_D(tCrA);
  auto tCrB_v = thr_b.retile_D(tCrB);
  cute::copy(copy_a, tCsA(_, _, _0{}), tCrA_v(_, _, _0{}));
  cute::copy(copy_b, tCsB(_, _, _0{}), tCrB_v(_, _, _0{}));
  CUTE_UNROLL
  for (int i = 0; i < size<2>(tCrA); ++i) {
    if (i + 1 < size<2>(tCrA)) {
      cute::copy(copy_a, tCsA(_, _, i + 1), tCrA_v(_, _, i + 1));
      cute::copy(copy_b, tCsB(_, _, i + 1), tCrB_v(_, _, i + 1));
    }
    cute::gemm(mma, tCrA(_, _, i), tCrB(_, _, i), acc);
  }
}

template <class TiledMma, class Acc, class RA, class RB, class SB, class CopyB>
__device__ __forceinline__ void gemm_rs(TiledMma& mma, Acc& acc, RA const& tCrA, RB& tCrB, SB const& tCsB,
                                        CopyB const& copy_b, int tidx) {
  using namespace cute;
  auto thr_b = copy_b.get_thread_slice(tidx);
  auto tCrB_v = thr_b.retile_D(tCrB);
  cute::copy(copy_b, tCsB(_, _, _0{}), tCrB_v(_, _, _0{}));
  CUTE_UNROLL
  for (int i = 0; i < size<2>(tCrA); ++i) {
    if (i + 1 < size<2>(tCrA)) {
      cute::copy(copy_b, tCsB(_, _, i + 1), tCrB_v(_, _, i + 1));
    }
    cute::gemm(mma, tCrA(_, _, i), tCrB(_, _, i), acc);
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Quad reductions: the four lanes of an m16n8 row group hold one row between them.

// Maximum of row mi of a (rows, columns) register view, and the in-place exponentials exp2(x * scale - m_scaled)
// of that row with their sum. Four independent chains: a single chain over a row's 16 values is a latency chain
// (4-cycle steps) that the few warps resident per scheduler cannot hide.
template <class T>
__device__ __forceinline__ float row_max(T const& S, int mi) {
  constexpr int kN = decltype(cute::size<1>(S))::value;
  if constexpr (kN % 4 == 0) {
    float m0 = S(mi, 0), m1 = S(mi, 1), m2 = S(mi, 2), m3 = S(mi, 3);
    CUTE_UNROLL
    for (int ni = 4; ni < kN; ni += 4) {
      m0 = fmaxf(m0, S(mi, ni));
      m1 = fmaxf(m1, S(mi, ni + 1));
      m2 = fmaxf(m2, S(mi, ni + 2));
      m3 = fmaxf(m3, S(mi, ni + 3));
    }
    return fmaxf(fmaxf(m0, m1), fmaxf(m2, m3));
  } else {
    float m = S(mi, 0);
    CUTE_UNROLL
    for (int ni = 1; ni < kN; ++ni) m = fmaxf(m, S(mi, ni));
    return m;
  }
}

// exp2(S * scale - m_scaled) in place over row mi; returns the row's sum (four independent addition chains).
template <class T>
__device__ __forceinline__ float row_exp2_sum(T& S, int mi, float scale, float m_scaled) {
  constexpr int kN = decltype(cute::size<1>(S))::value;
  constexpr int kChains = kN % 4 == 0 ? 4 : 1;
  float sum[kChains];
  CUTE_UNROLL
  for (int c = 0; c < kChains; ++c) sum[c] = 0.f;
  CUTE_UNROLL
  for (int ni = 0; ni < kN; ++ni) {
    const float e = exp2f(S(mi, ni) * scale - m_scaled);
    S(mi, ni) = e;
    sum[ni % kChains] += e;
  }
  if constexpr (kChains == 4) return (sum[0] + sum[1]) + (sum[2] + sum[3]);
  return sum[0];
}

// exp2(S * scale - m_scaled) in place over row mi, without the row sum (a kernel that gets it from the PV product).
template <class T>
__device__ __forceinline__ void row_exp2(T& S, int mi, float scale, float m_scaled) {
  CUTE_UNROLL
  for (int ni = 0; ni < decltype(cute::size<1>(S))::value; ++ni) S(mi, ni) = exp2f(S(mi, ni) * scale - m_scaled);
}

__device__ __forceinline__ float quad_max(float x) {
  x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
  x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
  return x;
}

__device__ __forceinline__ float quad_sum(float x) {
  x += __shfl_xor_sync(0xffffffffu, x, 1);
  x += __shfl_xor_sync(0xffffffffu, x, 2);
  return x;
}

// ---------------------------------------------------------------------------------------------------------------
// Stores of fp32 results in the 16-bit element type.

// Two adjacent elements (one 4-byte store: D and even columns keep it aligned).
template <typename Element>
__device__ __forceinline__ void store_pair(Element* dst, float a, float b) {
  cutlass::Array<float, 2> f;
  f[0] = a;
  f[1] = b;
  cutlass::NumericArrayConverter<Element, float, 2> conv;
  *reinterpret_cast<cutlass::Array<Element, 2>*>(dst) = conv(f);
}

// Forward epilogue, shared by the sm80 and sm90 kernels: O (rows x columns view of the accumulator, `coord` the
// same view of its (row, column) coordinates in the tile, rows offset by r0) divided by the quad-reduced row sums
// and written as column pairs (D even); lse = (row_max * scale_log2 + log2(sum)) * ln 2 by the lane holding column 0.
template <typename Element, class TO, class TC, int kRows>
__device__ __forceinline__ void store_out_lse(TO const& O, TC const& coord, const float (&row_max)[kRows],
                                              const float (&row_sum)[kRows], int r0, int N, int D, Element* out_base,
                                              int64_t out_row_stride, float* lse_base, float scale_log2) {
  constexpr float kLn2 = 0.69314718055994530942f;
  CUTE_UNROLL
  for (int mi = 0; mi < decltype(cute::size<0>(O))::value; ++mi) {
    const float sum = quad_sum(row_sum[mi]);
    const float inv = 1.f / sum;
    const int row = r0 + int(cute::get<0>(coord(mi, 0)));
    if (row < N) {
      Element* orow = out_base + int64_t(row) * out_row_stride;
      CUTE_UNROLL
      for (int nj = 0; nj < decltype(cute::size<1>(O))::value / 2; ++nj) {
        const int col = int(cute::get<1>(coord(mi, 2 * nj)));
        if (col < D) store_pair(orow + col, O(mi, 2 * nj) * inv, O(mi, 2 * nj + 1) * inv);
      }
      if (int(cute::get<1>(coord(mi, 0))) == 0) lse_base[row] = (row_max[mi] * scale_log2 + log2f(sum)) * kLn2;
    }
  }
}

// ---------------------------------------------------------------------------------------------------------------
// 16-bit element <-> float helpers for the register-staged (scaled) loads.

template <typename T> struct Pack2;
template <> struct Pack2<cutlass::half_t> {
  static __device__ __forceinline__ uint32_t scale(uint32_t w, float s) {
    __half2 h = *reinterpret_cast<__half2*>(&w);
    float2 f = __half22float2(h);
    __half2 r = __floats2half2_rn(f.x * s, f.y * s);
    return *reinterpret_cast<uint32_t*>(&r);
  }
  static __device__ __forceinline__ uint16_t scale1(uint16_t w, float s) {
    __half h = *reinterpret_cast<__half*>(&w);
    __half r = __float2half_rn(__half2float(h) * s);
    return *reinterpret_cast<uint16_t*>(&r);
  }
};
template <> struct Pack2<cutlass::bfloat16_t> {
  static __device__ __forceinline__ uint32_t scale(uint32_t w, float s) {
    __nv_bfloat162 h = *reinterpret_cast<__nv_bfloat162*>(&w);
    float2 f = __bfloat1622float2(h);
    __nv_bfloat162 r = __floats2bfloat162_rn(f.x * s, f.y * s);
    return *reinterpret_cast<uint32_t*>(&r);
  }
  static __device__ __forceinline__ uint16_t scale1(uint16_t w, float s) {
    __nv_bfloat16 h = *reinterpret_cast<__nv_bfloat16*>(&w);
    __nv_bfloat16 r = __float2bfloat16_rn(__bfloat162float(h) * s);
    return *reinterpret_cast<uint16_t*>(&r);
  }
};

}  // namespace dev
}  // namespace rfsr
