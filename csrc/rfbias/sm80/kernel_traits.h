// Compile-time configuration of the sm80 (mma.sync m16n8k16) kernels: the MMA/copy atoms both directions use, and
// the forward's tiles (the backward's are in bwd_kernel.h).
#pragma once

#include <type_traits>

#include <cute/tensor.hpp>
#include <cute/atom/mma_atom.hpp>
#include <cute/atom/copy_atom.hpp>
#include <cutlass/numeric_types.h>

namespace rfsr {

// m16n8k16 MMA with fp32 accumulation, kNWarps warps stacked along M (16 rows each), and the ldmatrix atoms that
// feed it (plain, and transposed for operands stored the other way round).
template <typename Element, int kNWarps>
struct Sm80MmaAtoms {
  using MmaOp = std::conditional_t<std::is_same_v<Element, cutlass::half_t>, cute::SM80_16x8x16_F32F16F16F32_TN,
                                   cute::SM80_16x8x16_F32BF16BF16F32_TN>;
  using TiledMma = cute::TiledMMA<cute::MMA_Atom<MmaOp>,
                                  cute::Layout<cute::Shape<cute::Int<kNWarps>, cute::_1, cute::_1>>,
                                  cute::Tile<cute::Int<16 * kNWarps>, cute::_16, cute::_16>>;
  using SmemCopyAtom = cute::Copy_Atom<cute::SM75_U32x4_LDSM_N, Element>;
  using SmemCopyAtomT = cute::Copy_Atom<cute::SM75_U16x8_LDSM_T, Element>;
};

// kDqk: width of the packed [q | bias_q | 0] and [k | bias_k | 0] rows (multiple of 16).
// kDv:  width of v and of the output accumulator (multiple of 16, >= D).
template <typename Element_, int kDqk_, int kDv_, int kBlockM_, int kBlockN_, int kNWarps_, int kStages_,
          int kMinBlocks_>
struct FwdTraitsSm80 {
  using Element = Element_;
  static constexpr int kDqk = kDqk_;
  static constexpr int kDv = kDv_;
  static constexpr int kBlockM = kBlockM_;
  static constexpr int kBlockN = kBlockN_;
  static constexpr int kNWarps = kNWarps_;
  static constexpr int kNThreads = 32 * kNWarps;
  static constexpr int kStages = kStages_;        // depth of the K/V cp.async ring (>= 2)
  static constexpr int kMinBlocks = kMinBlocks_;  // __launch_bounds__ occupancy hint (caps registers)
  static_assert(kStages >= 2, "the K/V ring needs at least two slots");

  static_assert(kDqk % 16 == 0 && kDv % 16 == 0 && kDv <= kDqk, "bad head-dim bucket");
  static_assert(kBlockM % (16 * kNWarps) == 0, "each warp owns 16-row slices of the query tile");
  static_assert(kBlockN % 16 == 0, "key tile must be a multiple of 16");

  // Shared-memory rows are padded by 8 elements (16 bytes): consecutive rows then start in different 16-byte
  // bank groups, so the 8 row addresses of each ldmatrix phase hit 8 distinct groups (no conflicts), and any
  // 4-byte-granular column offset stays addressable (no swizzle to respect for the D = 30 staging path).
  static constexpr int kQKStride = kDqk + 8;
  static constexpr int kVStride = kDv + 8;

  using TiledMma = typename Sm80MmaAtoms<Element, kNWarps>::TiledMma;

  using SmemLayoutQ = cute::Layout<cute::Shape<cute::Int<kBlockM>, cute::Int<kDqk>>,
                                   cute::Stride<cute::Int<kQKStride>, cute::_1>>;
  using SmemLayoutK = cute::Layout<cute::Shape<cute::Int<kBlockN>, cute::Int<kDqk>>,
                                   cute::Stride<cute::Int<kQKStride>, cute::_1>>;
  // V stored row-major (key, d); read as its transpose (d, key) for the B operand of O += P V.
  using SmemLayoutVt = cute::Layout<cute::Shape<cute::Int<kDv>, cute::Int<kBlockN>>,
                                    cute::Stride<cute::_1, cute::Int<kVStride>>>;

  using SmemCopyAtom = typename Sm80MmaAtoms<Element, kNWarps>::SmemCopyAtom;
  using SmemCopyAtomTransposed = typename Sm80MmaAtoms<Element, kNWarps>::SmemCopyAtomT;

  static constexpr int kSmemQ = kBlockM * kQKStride;  // elements
  static constexpr int kSmemK = kBlockN * kQKStride;
  static constexpr int kSmemV = kBlockN * kVStride;
  static constexpr int kSmemBytes = (kSmemQ + kStages * (kSmemK + kSmemV)) * int(sizeof(Element));
};

// Tile choice per head-dim bucket (one place). 4 warps; each warp owns 16 query rows per 64-row slice.
// 64-wide key tiles: 128-wide ones need all 255 registers (2 CTAs/SM) and measured slower (see below).
template <typename Element, int kDqk, int kDv>
struct FwdConfigSm80 {
  // 64-row query tiles where the accumulators would not fit in registers at 128 rows (Dv = 128) and where
  // shared memory would grow past what sm80 offers (Dqk >= 192).
  static constexpr int kBlockM = (kDqk >= 192 || kDv >= 128) ? 64 : 128;
  static constexpr int kBlockN = 64;
  static constexpr bool kSmall = kDqk <= 96 && kDv <= 32;
  // Three CTAs per SM (<= 168 registers) for the small buckets: the loop is latency-bound, not MMA-bound.
  static constexpr int kMinBlocks = kSmall ? 3 : 2;
  static constexpr int kStages = kDqk <= 96 ? 3 : 2;
  using Traits = FwdTraitsSm80<Element, kDqk, kDv, kBlockM, kBlockN, 4, kStages, kMinBlocks>;
  // Measured on H200 (bf16, SST shapes): 64x64 and 64x128 tiles at 4 CTAs/SM were 10-50% slower than
  // 128x64 at 3 CTAs/SM, 128x128 at 2 CTAs/SM 5-18% slower; 2 vs 3 vs 4 stages within 5%.
};

}  // namespace rfsr
