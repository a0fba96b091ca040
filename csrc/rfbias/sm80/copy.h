// Global -> shared tile copies of the sm80 kernels (cp.async). Rows of q/k/v/dO land in columns [0, D) of a
// padded shared-memory row; factor rows land in [col0, col0 + R).
//
// Rows past `valid_rows` are either left untouched (kZeroFill = false: the forward relies on a slot that still
// holds its initial zeros) or written as zeros (kZeroFill = true: the backward reuses slots across windows, so a
// partial tile must not keep a previous window's rows). Zero-filling copies read nothing from global memory.
#pragma once

#include <cstdint>

#include "../common/utils.h"

namespace rfsr {
namespace sm80 {

// Per-thread plan for copying a tile of kRows rows x kWidth elements (valid columns [0, D)) with vectors of
// kVec elements: a thread always serves the same column and every (kThreads / (kWidth / kVec))-th row, so
// the addresses are computed once per CTA and each copy costs one add.
template <class Traits, int kRows, int kWidth, int kVec>
struct RowCopyPlan {
  static constexpr int kPerRow = kWidth / kVec;
  static_assert(Traits::kNThreads % kPerRow == 0, "a thread row-group must be whole");
  static constexpr int kRowsPerIt = Traits::kNThreads / kPerRow;
  static constexpr int kIts = (kRows + kRowsPerIt - 1) / kRowsPerIt;
  static constexpr int kTileRows = kRows;
  int row;   // first row of this thread
  int col;   // element column of this thread
  bool active;
  __device__ __forceinline__ RowCopyPlan(int tidx, int D) {
    row = tidx / kPerRow;
    col = (tidx % kPerRow) * kVec;
    active = col < D;
  }
};

// Asynchronous copy of one tile. g points at the tile's first row (always a valid row).
template <class Plan, int kVec, int kSStride, bool kZeroFill = false, typename Element>
__device__ __forceinline__ void copy_tile_async(const Plan& plan, Element* s, const Element* g, int64_t g_row_stride,
                                                int valid_rows) {
  if (!plan.active) return;
  const Element* src = g + plan.row * g_row_stride + plan.col;
  Element* dst = s + plan.row * kSStride + plan.col;
  const int64_t step = int64_t(Plan::kRowsPerIt) * g_row_stride;
  if (valid_rows >= Plan::kTileRows) {  // every tile but a window's last: no per-row tests
    CUTE_UNROLL
    for (int it = 0; it < Plan::kIts; ++it) {
      if (Plan::kTileRows % Plan::kRowsPerIt == 0 || plan.row + it * Plan::kRowsPerIt < Plan::kTileRows) {
        if constexpr (kVec == 8) {
          dev::cp_async_16(dst + it * Plan::kRowsPerIt * kSStride, src, true);
        } else {
          dev::cp_async_4(dst + it * Plan::kRowsPerIt * kSStride, src, true);
        }
      }
      src += step;
    }
    return;
  }
  CUTE_UNROLL
  for (int it = 0; it < Plan::kIts; ++it) {
    const int r = plan.row + it * Plan::kRowsPerIt;
    const bool ok = r < valid_rows;
    if (ok || (kZeroFill && r < Plan::kTileRows)) {
      // A zero-filling copy still needs a readable address: the tile's first row.
      const Element* from = ok ? src : g;
      if constexpr (kVec == 8) {
        dev::cp_async_16(dst + it * Plan::kRowsPerIt * kSStride, from, ok);
      } else {
        dev::cp_async_4(dst + it * Plan::kRowsPerIt * kSStride, from, ok);
      }
    }
    src += step;
  }
}

// Factor rows: R runtime columns copied into [col0, col0 + R) of a tile. The thread -> (row, unit) mapping is
// computed once per CTA from R (R <= 128 units per row and >= 128 threads: every unit has a thread).
struct FactorCopyPlan {
  int units;         // copy units per row (words if vec2 else elements)
  int rows_per_it;   // rows covered by one pass of the CTA
  int row, unit;     // this thread's first row and unit
  bool active;
  __device__ __forceinline__ FactorCopyPlan(int tidx, int nthreads, int R, bool vec2) {
    units = vec2 ? (R >> 1) : R;
    if (units <= 0) {
      rows_per_it = 1; row = 0; unit = 0; active = false;
      return;
    }
    rows_per_it = nthreads / units;
    active = tidx < rows_per_it * units;
    row = tidx / units;
    unit = tidx - row * units;
  }
};

// vec2: 4-byte asynchronous copies; otherwise synchronous 2-byte copies (odd rank or unaligned factor rows).
// Two walks over the rows, the same copies:
//   kIndexed = false: two pointers advance per row (13 instructions a row in the SASS against 21: no 64-bit multiply
//                     or select per row); the backward kernels, where the loop is still 12-14% of all instructions.
//   kIndexed = true:  each row's addresses come from the row index (fewer live registers). The sm80 forward, at its
//                     168-register cap, spills with the pointer walk and measured 15% slower at N = 256 (H200).
template <int kRows, int kSStride, bool kZeroFill = false, bool kIndexed = false, typename Element>
__device__ __forceinline__ void copy_factor_rows(const FactorCopyPlan& plan, Element* s, int col0, const Element* g,
                                                 int64_t g_row_stride, int valid_rows, bool vec2) {
  if (!plan.active) return;
  if constexpr (kIndexed) {
    const int last = kZeroFill ? kRows : min(kRows, valid_rows);
    const int c = vec2 ? plan.unit * 2 : plan.unit;
    if (vec2) {
      for (int r = plan.row; r < last; r += plan.rows_per_it) {
        const bool ok = r < valid_rows;
        dev::cp_async_4(s + r * kSStride + col0 + c, ok ? g + r * g_row_stride + c : g, ok);
      }
    } else {
      for (int r = plan.row; r < last; r += plan.rows_per_it) {
        *reinterpret_cast<uint16_t*>(s + r * kSStride + col0 + c) =
            r < valid_rows ? *reinterpret_cast<const uint16_t*>(g + r * g_row_stride + c) : uint16_t(0);
      }
    }
    return;
  }
  const int c = vec2 ? plan.unit * 2 : plan.unit;
  Element* dst = s + plan.row * kSStride + col0 + c;
  const Element* src = g + plan.row * g_row_stride + c;
  const int64_t step = int64_t(plan.rows_per_it) * g_row_stride;
  const int dst_step = plan.rows_per_it * kSStride;
  const int n_valid = min(kRows, valid_rows);
  int r = plan.row;
  if (vec2) {
    for (; r < n_valid; r += plan.rows_per_it, src += step, dst += dst_step) dev::cp_async_4(dst, src, true);
    if constexpr (kZeroFill) {  // rows past the end: zero-filling copies (they read nothing)
      for (; r < kRows; r += plan.rows_per_it, dst += dst_step) dev::cp_async_4(dst, g, false);
    }
  } else {
    for (; r < n_valid; r += plan.rows_per_it, src += step, dst += dst_step) {
      *reinterpret_cast<uint16_t*>(dst) = *reinterpret_cast<const uint16_t*>(src);
    }
    if constexpr (kZeroFill) {
      for (; r < kRows; r += plan.rows_per_it, dst += dst_step) *reinterpret_cast<uint16_t*>(dst) = uint16_t(0);
    }
  }
}

}  // namespace sm80
}  // namespace rfsr
