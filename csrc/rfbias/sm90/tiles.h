// Shared-memory tiles of the sm90a (wgmma) kernels: the register-layout helpers of the wgmma accumulators and the
// per-thread copy plans that write global rows into the swizzled tile layouts wgmma reads (GMMA canonical layouts).
// Used by the warp-specialised forward (fwd_ws_kernel.h) and the wgmma backward (bwd_kernel.h).
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
  // Makes the per-thread offsets opaque to the compiler, so that a loop over many tiles keeps them in registers
  // rather than recomputing the swizzle for every copy.
  __device__ __forceinline__ void pin() {
    CUTE_UNROLL
    for (int u = 0; u < kUnits; ++u) asm volatile("" : "+r"(s_off[u]));
    asm volatile("" : "+r"(s_step));
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
  // Rows [valid_rows, kRows) of the tile as zeros (zero-filling cp.async: nothing is read from `any`, a readable
  // address), for a slot that may hold another window's rows.
  __device__ __forceinline__ void zero_tail(Element* dst, int valid_rows, const Element* any) const {
    CUTE_UNROLL
    for (int it = 0; it < kIts; ++it) {
      const int r = row + it * kRowsPerIt;
      if (r >= valid_rows && (kRows % kRowsPerIt == 0 || r < kRows)) {
        CUTE_UNROLL
        for (int u = 0; u < kUnits; ++u) {
          if (col_ok[u]) {
            if constexpr (kVec == 8) {
              dev::cp_async_16(dst + s_off[u] + it * s_step, any, false);
            } else {
              dev::cp_async_4(dst + s_off[u] + it * s_step, any, false);
            }
          }
        }
      }
    }
  }
};

// Factor rows into columns [D, D + R) of a swizzled tile, 16-byte units (vec8: D and R multiples of 8 and 16-byte
// aligned rows), 4-byte units (vec2) or 2-byte ones. A row's units are
// spread over up to kNThreads / 8 threads (each takes every tpr-th unit, at most kMaxK of them), so rows still
// advance in multiples of 8 and every offset is computed once per CTA. kMaxRank bounds R (a tile of kDqk columns
// holds R < kDqk): the offsets a thread keeps are registers, which the warp-specialised producer is short of.
template <int kNThreads, int kMaxRank = 128>
struct SwizzledFactorPlan {
  static constexpr int kMaxTpr = kNThreads / 8;
  static constexpr int kMaxK = (kMaxRank + kMaxTpr - 1) / kMaxTpr;
  int units, tpr, rows_per_it, row, lane_unit, s_step, nk, kk;
  int s_off[kMaxK];
  bool active, vec8;
  template <class STensor>
  __device__ __forceinline__ SwizzledFactorPlan(int tidx, int D, int R, bool vec2, STensor const& s,
                                                bool vec8_ = false) {
    vec8 = vec8_ && vec2;
    units = vec8 ? R / 8 : vec2 ? R / 2 : R;
    active = units > 0;
    tpr = max(1, min(units, kMaxTpr));
    rows_per_it = (kNThreads / tpr) / 8 * 8;
    active = active && tidx < rows_per_it * tpr;
    row = tidx / tpr;
    lane_unit = tidx - row * tpr;
    nk = (units - lane_unit + tpr - 1) / tpr;  // units of this thread in a row: kk or kk - 1
    kk = (units + tpr - 1) / tpr;
    const int w = vec8 ? 8 : vec2 ? 2 : 1;
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
  __device__ __forceinline__ void pin() {  // as SwizzledRowPlan::pin
    CUTE_UNROLL
    for (int k = 0; k < kMaxK; ++k) asm volatile("" : "+r"(s_off[k]));
    asm volatile("" : "+r"(s_step));
  }
  // kTileRows (the tile's rows, 0: unknown) enables the unrolled copy of full tiles below.
  template <int kTileRows = 0, typename Element>
  __device__ __forceinline__ void copy(Element* dst, const Element* g, int64_t row_stride, int valid_rows, bool vec2,
                                       float mult) const {
    if (!active) return;
    if (vec8) {
      copy_vec8(dst, g, row_stride, valid_rows);
      return;
    }
    if constexpr (kTileRows > 0) {
      if (vec2 && rows_per_it == 8 && kk <= 2 && valid_rows >= kTileRows) {
        copy_full8<kTileRows>(dst, g, row_stride);
        return;
      }
    }
    copy_k<1>(dst, g, row_stride, valid_rows, vec2, mult);
  }
  // 16-byte units: a quarter of the copies of 4-byte units (at R = 32, 4 instead of 16 a thread per 128-row tile).
  template <typename Element>
  __device__ __forceinline__ void copy_vec8(Element* dst, const Element* g, int64_t row_stride, int valid_rows) const {
    const Element* src = g + row * row_stride + lane_unit * 8;
    const int64_t step = int64_t(rows_per_it) * row_stride;
    const int src_k = tpr * 8;
    int row_off = 0;
    for (int r = row; r < valid_rows; r += rows_per_it, src += step, row_off += s_step) {
      CUTE_UNROLL
      for (int k = 0; k < kMaxK; ++k) {
        if (k < nk) dev::cp_async_16(dst + s_off[k] + row_off, src + k * src_k, true);
      }
    }
  }
  // A full tile of 4-byte units with 8 rows a pass (9 or more units a row: the SST ranks) and at most 2 units a
  // thread: every pass unrolled, so a copy costs its address adds and no loop or predicate arithmetic (the row loop
  // of copy_k issued about 19 instructions a pass, half of the producer's work per tile at D = 30, R = 34).
  template <int kTileRows, typename Element>
  __device__ __forceinline__ void copy_full8(Element* dst, const Element* g, int64_t row_stride) const {
    static_assert(kTileRows % 8 == 0, "whole passes");
    const Element* src = g + row * row_stride + lane_unit * 2;
    const int64_t step = 8 * row_stride;
    const int src_k = tpr * 2;
    Element* d0 = dst + s_off[0];
    Element* d1 = dst + s_off[1 < kMaxK ? 1 : 0];
    const bool two = nk > 1;
    CUTE_UNROLL
    for (int it = 0; it < kTileRows / 8; ++it) {
      dev::cp_async_4(d0 + it * s_step, src, true);
      if (two) dev::cp_async_4(d1 + it * s_step, src + src_k, true);
      src += step;
    }
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
  // Rows [valid_rows, rows) of the factor columns as zeros: zero-filling cp.async (`any` is a readable address; nothing
  // is read) with vec2, plain stores otherwise.
  template <typename Element>
  __device__ __forceinline__ void zero_tail(Element* dst, const Element* any, int valid_rows, int rows,
                                            bool vec2) const {
    if (!active) return;
    const int first = row + max(0, (valid_rows - row + rows_per_it - 1) / rows_per_it) * rows_per_it;
    int row_off = (first - row) / rows_per_it * s_step;
    for (int r = first; r < rows; r += rows_per_it, row_off += s_step) {
      CUTE_UNROLL
      for (int k = 0; k < kMaxK; ++k) {  // constant indices keep s_off in registers
        if (k < nk) {
          if (vec8) {
            dev::cp_async_16(dst + s_off[k] + row_off, any, false);
          } else if (vec2) {
            dev::cp_async_4(dst + s_off[k] + row_off, any, false);
          } else {
            *reinterpret_cast<uint16_t*>(dst + s_off[k] + row_off) = uint16_t(0);
          }
        }
      }
    }
  }
};

}  // namespace sm90
}  // namespace rfsr
