// sm90a forward kernel, warp-specialised: one producer warpgroup copies, kConsumers warpgroups compute.
//
// A uniform wgmma kernel (every thread copying its share of each K/V tile, one CTA barrier per tile; retired
// 2026-11-27) spent a large share of the issue slots of the softmax warps on copies: with D = 30 rows every copy is a
// 4-byte cp.async. Here:
//   * warpgroup 0 (the producer) builds the copy plans once and streams [k | bias_k] and v tiles into a kStages-deep
//     ring, each slot guarded by a `full` mbarrier (the producer threads' cp.async arrivals) and an `empty` one
//     (one arrival per consumer warp once its wgmmas that read the slot have retired); it also stages the query
//     tiles [q * q_mult | bias_q * bq_mult] and scales them in place;
//   * warpgroups 1..kConsumers each own 64 query rows and run the wgmma loop (S(j + 1) and O += P(j) V(j) queued
//     back to back, the softmax of S(j + 1) during the PV product) with no copies and no CTA barriers: a consumer
//     waits only for the slot it reads next;
//   * CTAs are persistent (as many as fit on the device at once, each walking work items w, w + grid, ...): the ring
//     carries on across items, and the producer stages the next item's query tiles into the second of two query
//     buffers while the consumers finish the current item (without this the consumers spent about a tenth of their
//     time waiting for the first query tile of each CTA; benchmarks/results/fwd-ws-h200-2026-11-27.md, 4). The
//     producer's copy plans are pinned (tiles.h, pin()) so that they stay in registers across items: recomputed per
//     copy, they made the producer the bottleneck with 4-byte rows (same notes, 8).
// Where the launch bound leaves the consumers too few registers (several CTAs per SM, three consumers), registers
// move from the producer to them (setmaxnreg). Shared-memory tiles and copy plans: tiles.h (GMMA canonical swizzled
// layouts, SwizzledRowPlan / SwizzledFactorPlan). The binding takes this kernel for the large
// windows of the SST-family buckets on 9.x devices (csrc/rfbias_cuda.cpp); RFSR_FWD_PATH=sm90 forces it.
// Evaluation: benchmarks/results/fwd-ws-h200-2026-11-27.md, scripts/gpu_eval.sh.
//
// Ordering of the copies with wgmma: cp.async writes are made visible through the mbarrier (each producer thread's
// cp.async.mbarrier.arrive.noinc arrives once its copies have landed). Writes that are not cp.async (the odd-rank
// factor copies, the in-place scaling of the query tile) are followed by an async-proxy fence and a plain arrive
// (release), counted in the barrier's expected arrivals.
#pragma once

#include <algorithm>

#include "tiles.h"

#include <cutlass/arch/barrier.h>
#include <cutlass/arch/reg_reconfig.h>

// Registers kept by the producer warpgroup (its copy plans and row loops must fit without spilling).
#ifndef RFSR_SM90WS_PRODUCER_REGS
#define RFSR_SM90WS_PRODUCER_REGS 40
#endif
// The same for the three-consumer configuration of the SST-family buckets (FwdWsConfig), and whether the 4-byte
// kernel also takes the unrolled factor copies (experiment switches; the defaults are the measured choice).
#ifndef RFSR_SM90WS_NARROW_PRODUCER_REGS
#define RFSR_SM90WS_NARROW_PRODUCER_REGS 80
#endif
#ifndef RFSR_SM90WS_UNROLL_FACTORS_4B
#define RFSR_SM90WS_UNROLL_FACTORS_4B 1
#endif
// Pinned copy plans (SwizzledRowPlan::pin): without, the persistent producer recomputed the swizzled offsets for
// every copy and ran at half speed with 4-byte rows (fwd-ws-h200-2026-11-27.md, 7b).
#ifndef RFSR_SM90WS_PIN_PLANS
#define RFSR_SM90WS_PIN_PLANS 1
#endif

namespace rfsr {
namespace sm90 {

template <typename Element_, int kDqk_, int kDv_, int kConsumers_, int kBlockN_, int kStages_, int kMinBlocks_,
          int kProducerRegs_ = RFSR_SM90WS_PRODUCER_REGS>
struct FwdWsTraits {
  using Element = Element_;
  static constexpr int kDqk = kDqk_;
  static constexpr int kDv = kDv_;
  static constexpr int kConsumers = kConsumers_;
  static constexpr int kBlockM = 64 * kConsumers;  // query rows per CTA, 64 per consumer warpgroup
  static constexpr int kBlockN = kBlockN_;
  static constexpr int kNThreads = 128 * (kConsumers + 1);
  static constexpr int kStages = kStages_;
  static constexpr int kMinBlocks = kMinBlocks_;
  static_assert(kStages >= 2, "a ring needs two slots");
  static_assert(kDqk % 16 == 0 && kDv % 16 == 0 && kBlockN % 16 == 0, "wgmma tile constraints");
  // Largest rank a bucket can hold (R < kDqk, and the binding takes R <= 128): bounds the factor copy plans.
  static constexpr int kMaxRank = kDqk < 128 ? kDqk : 128;

  // Registers: the launch bound gives every thread kLaunchRegs. When that is too few for the consumers (more than
  // one CTA per SM), registers move from the producer to the consumers with setmaxnreg (multiples of 8): the
  // producer keeps kProducerRegs, the consumers share the rest of the CTA's part of the register file.
  static constexpr int kLaunchRegs = (65536 / (kNThreads * kMinBlocks) > 255 ? 255 : 65536 / (kNThreads * kMinBlocks)) / 8 * 8;
  static constexpr bool kRealloc = kLaunchRegs < 160;
  static constexpr int kProducerRegs = kProducerRegs_;
  // setmaxnreg moves registers within the CTA's own allocation (kNThreads x kLaunchRegs, what ptxas gives the
  // kernel at the launch bound): a consumer request beyond what the producer released would never be granted.
  static constexpr int kConsumerRegsRaw =
      (kNThreads * kLaunchRegs - 128 * kProducerRegs) / (128 * kConsumers);
  static constexpr int kConsumerRegs = (kConsumerRegsRaw > 240 ? 240 : kConsumerRegsRaw) / 8 * 8;
  static_assert(!kRealloc || (kConsumerRegs >= 96 && kProducerRegs <= kLaunchRegs), "register split");

  // One warpgroup per MMA: each consumer runs its own 64-row GEMMs.
  using TiledMmaS = decltype(cute::make_tiled_mma(
      cute::GMMA::ss_op_selector<Element, Element, float, cute::Shape<cute::_64, cute::Int<kBlockN>, cute::Int<kDqk>>>()));
  using TiledMmaO = decltype(cute::make_tiled_mma(
      cute::GMMA::rs_op_selector<Element, Element, float, cute::Shape<cute::_64, cute::Int<kDv>, cute::Int<kBlockN>>,
                                 cute::GMMA::Major::K, cute::GMMA::Major::MN>()));

  using SmemLayoutQ = decltype(cute::tile_to_shape(
      cutlass::gemm::collective::detail::ss_smem_selector<cute::GMMA::Major::K, Element, cute::_64,
                                                          cute::Int<kDqk>>(),
      cute::Shape<cute::_64, cute::Int<kDqk>>{}));
  using SmemLayoutK = decltype(cute::tile_to_shape(
      cutlass::gemm::collective::detail::ss_smem_selector<cute::GMMA::Major::K, Element, cute::Int<kBlockN>,
                                                          cute::Int<kDqk>>(),
      cute::Shape<cute::Int<kBlockN>, cute::Int<kDqk>>{}));
  using SmemLayoutVt = decltype(cute::tile_to_shape(
      cutlass::gemm::collective::detail::ss_smem_selector<cute::GMMA::Major::MN, Element, cute::Int<kDv>,
                                                          cute::Int<kBlockN>>(),
      cute::Shape<cute::Int<kDv>, cute::Int<kBlockN>>{}));

  static constexpr int align1k(int bytes) { return (bytes + 1023) / 1024 * 1024; }
  static constexpr int kBytesQ = align1k(64 * kDqk * int(sizeof(Element)));  // one consumer's query tile
  static constexpr int kBytesK = align1k(kBlockN * kDqk * int(sizeof(Element)));
  static constexpr int kBytesV = align1k(kBlockN * kDv * int(sizeof(Element)));
  // Two query buffers (the producer stages the next work item's query tiles while the consumers finish the current
  // one) where they fit in the 227 KiB a CTA can have, one otherwise (the widest buckets).
  static constexpr int kMaxSmem = 232448;
  static constexpr int kBytesRing = kStages * (kBytesK + kBytesV);
  static constexpr int kBytesBarriers = (2 * kStages + 4) * 8;  // full[], empty[], query_full[2], query_empty[2]
  static constexpr int kQBufs = 2 * kConsumers * kBytesQ + kBytesRing + kBytesBarriers + 1024 <= kMaxSmem ? 2 : 1;
  static constexpr int kBytesTiles = kQBufs * kConsumers * kBytesQ + kBytesRing;
  static constexpr int kSmemBytes = kBytesTiles + kBytesBarriers + 1024;  // + alignment slack
  static_assert(kSmemBytes <= kMaxSmem, "shared memory of one CTA");
};

// Tile choice per head-dim bucket. The SST-family buckets (Dqk <= 64, Dv <= 32) take three consumer warpgroups
// (192 query rows; the producer keeps 80 registers and the consumers get the rest): in the A/B of 2026-11-27 (H200,
// benchmarks/results/fwd-ws-h200-2026-11-27.md) that was 5-10% faster than two at N >= 4096, except D = 30, R = 34
// (within 4%). Wider buckets keep two consumers, with 64-key tiles where 128-key S tiles would not fit.
template <typename Element, int kDqk, int kDv>
struct FwdWsConfig {
  static constexpr bool kNarrow = kDqk <= 64 && kDv <= 32;
  static constexpr bool kWide = kDqk + kDv > 160;  // 128-key S tiles and a wide O would not fit the registers
  using Traits = FwdWsTraits<Element, kDqk, kDv, kNarrow ? 3 : 2, kWide ? 64 : 128, 3, 1,
                             kNarrow ? RFSR_SM90WS_NARROW_PRODUCER_REGS : RFSR_SM90WS_PRODUCER_REGS>;
};

template <class Traits, bool kVec16>
__global__ void __launch_bounds__(Traits::kNThreads, Traits::kMinBlocks) rfbias_fwd_ws_kernel(const RfbiasFwdParams p) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using namespace cute;
  using Element = typename Traits::Element;
  using Barrier = cutlass::arch::ClusterBarrier;
  constexpr int kBlockM = Traits::kBlockM;
  constexpr int kBlockN = Traits::kBlockN;
  constexpr int kDv = Traits::kDv;
  constexpr int kStages = Traits::kStages;
  constexpr int kConsumers = Traits::kConsumers;

  extern __shared__ uint8_t smem_dyn[];
  uint8_t* smem = reinterpret_cast<uint8_t*>((reinterpret_cast<uintptr_t>(smem_dyn) + 1023) & ~uintptr_t(1023));
  uint8_t* sQ_base = smem;
  constexpr int kQBufs = Traits::kQBufs;
  uint8_t* sK_base = sQ_base + kQBufs * kConsumers * Traits::kBytesQ;
  uint8_t* sV_base = sK_base + kStages * Traits::kBytesK;
  uint64_t* full_bar = reinterpret_cast<uint64_t*>(smem + Traits::kBytesTiles);
  uint64_t* empty_bar = full_bar + kStages;
  uint64_t* qfull_bar = empty_bar + kStages;
  uint64_t* qempty_bar = qfull_bar + 2;
  auto sQ_at = [&](int qb, int c) {
    return reinterpret_cast<Element*>(sQ_base + (qb * kConsumers + c) * Traits::kBytesQ);
  };
  auto sK_at = [&](int slot) { return reinterpret_cast<Element*>(sK_base + slot * Traits::kBytesK); };
  auto sV_at = [&](int slot) { return reinterpret_cast<Element*>(sV_base + slot * Traits::kBytesV); };

  // Persistent CTAs: work item w (a kBlockM-row query block of one window and head, in the launch order of a
  // one-block-per-item grid) runs on CTA w % gridDim.x; a CTA's K/V ring and query buffers carry on from one item
  // to the next, so the producer stages item i + 1's query tiles while the consumers finish item i.
  const int N = p.N, D = p.D, R = p.R;
  const int m_blocks = (N + kBlockM - 1) / kBlockM;
  const int n_blocks = (N + kBlockN - 1) / kBlockN;
  const int64_t items = int64_t(m_blocks) * p.B * p.H;
  struct Item { int m0, b, h; };
  auto item_at = [&](int64_t w) {
    const int64_t hb = w / m_blocks;
    return Item{int(w % m_blocks) * kBlockM, int(hb % p.B), int(hb / p.B)};
  };

  // The 4-byte-word kernel (D % 8 != 0, or rows not 16-byte aligned; run_fwd_ws guarantees D < kDv): the first pad
  // column of every V slot holds ones, and the PV product accumulates the softmax row sums in O's column D (from the
  // same bf16 P as the output, with the same rescaling), which takes the row-sum additions out of the softmax.
  constexpr bool kSumInO = !kVec16;

  // 1. Clear the tiles once (pad columns stay zero: copies write only columns [0, D + R)), set the ones column, and
  //    set up the barriers. Slots are reused across windows, so a partial key tile's rows past N are written as
  //    zeros by the producer (columns [0, D + R) only: the ones column stays).
  {
    uint4* z = reinterpret_cast<uint4*>(smem);
    for (int i = threadIdx.x; i < Traits::kBytesTiles / 16; i += Traits::kNThreads) z[i] = make_uint4(0, 0, 0, 0);
  }
  if constexpr (kSumInO) {
    __syncthreads();  // the clear of those words comes first
    for (int i = threadIdx.x; i < kStages * kBlockN; i += Traits::kNThreads) {
      Tensor sVt = make_tensor(make_smem_ptr(sV_at(i / kBlockN)), typename Traits::SmemLayoutVt{});
      sVt(D, i % kBlockN) = Element(1.0f);
    }
  }
  cutlass::arch::fence_view_async_shared();  // the cleared tiles and the ones column are read by wgmma
  // Factor words written by plain stores (odd rank or unaligned factor rows): each producer thread then arrives twice
  // per fill, once when its cp.async copies land and once (release) after its stores. The query tiles are scaled in
  // place when a multiplier is not 1 (the usual case: bq_mult = 1 / scale) and then handed over by one plain arrive.
  const bool sync_factors = R > 0 && !p.bias_vec2;
  const bool scale_q = p.q_mult != 1.0f || (R > 0 && p.bias_vec2 && p.bq_mult != 1.0f);
  const int fill_arrivals = sync_factors ? 256 : 128;
  if (threadIdx.x == 0) {
    for (int s = 0; s < kStages; ++s) {
      Barrier::init(&full_bar[s], fill_arrivals);
      Barrier::init(&empty_bar[s], 4 * kConsumers);  // one arrival per consumer warp
    }
    for (int qb = 0; qb < kQBufs; ++qb) {
      Barrier::init(&qfull_bar[qb], scale_q ? 128 : fill_arrivals);
      Barrier::init(&qempty_bar[qb], 4 * kConsumers);
    }
    cutlass::arch::fence_barrier_init();
  }
  __syncthreads();

  const int warpgroup = threadIdx.x / 128;
  const int tidx = threadIdx.x % 128;  // index inside the warpgroup

  if (warpgroup == 0) {
    // ---- Producer ------------------------------------------------------------------------------------------------
    if constexpr (Traits::kRealloc) cutlass::arch::warpgroup_reg_dealloc<Traits::kProducerRegs>();
    const Element* q0 = static_cast<const Element*>(p.q);
    const Element* k0 = static_cast<const Element*>(p.k);
    const Element* v0 = static_cast<const Element*>(p.v);
    constexpr int kVec = kVec16 ? 8 : 2;
    constexpr bool kUnrollFactors = kVec16 || RFSR_SM90WS_UNROLL_FACTORS_4B;
    Tensor sK0 = make_tensor(make_smem_ptr(sK_at(0)), typename Traits::SmemLayoutK{});
    Tensor sVt0 = make_tensor(make_smem_ptr(sV_at(0)), typename Traits::SmemLayoutVt{});
    Tensor sV0 = make_tensor(sVt0.data(), select<1, 0>(sVt0.layout()));  // (key, d) view of V^T
    Tensor sQ0 = make_tensor(make_smem_ptr(sQ_at(0, 0)), typename Traits::SmemLayoutQ{});
    // Plans from (b, h) = (0, 0); an item's rows are reached by a shift of the source.
    SwizzledRowPlan<128, kBlockN, kDv, kVec, Element> plan_k(tidx, sK0, k0, p.k_row_stride, D);
    SwizzledRowPlan<128, kBlockN, kDv, kVec, Element> plan_v(tidx, sV0, v0, p.v_row_stride, D);
    SwizzledFactorPlan<128, Traits::kMaxRank> plan_bk(tidx, D, R, p.bias_vec2, sK0, kVec16 && p.bias_vec8);
#if RFSR_SM90WS_PIN_PLANS
    plan_k.pin();
    plan_v.pin();
    plan_bk.pin();
#endif

    // This thread's arrivals for a fill of `bar`: one when the copies it issued have landed (noinc: that completion
    // is the arrival; the incrementing form plus a plain arrive is equivalent but compute-sanitizer's synccheck
    // reports it), and with plain-store factor words a second, release arrive that publishes them to the async proxy.
    auto arrive_fill = [&](uint64_t* bar) {
      cutlass::arch::cpasync_barrier_arrive_noinc(bar);
      if (sync_factors) {
        cutlass::arch::fence_view_async_shared();
        Barrier::arrive(bar);
      }
    };

    int t = 0;  // key tiles issued by this CTA: ring slot t % kStages, fill round t / kStages
    int it = 0;
    for (int64_t w = blockIdx.x; w < items; w += gridDim.x, ++it) {
      const Item item = item_at(w);
      const int qb = it % kQBufs;
      const int64_t kv_shift = int64_t(item.b) * p.k_batch_stride + int64_t(item.h) * p.k_head_stride;
      const int64_t v_shift = int64_t(item.b) * p.v_batch_stride + int64_t(item.h) * p.v_head_stride;
      const int64_t q_shift = int64_t(item.b) * p.q_batch_stride + int64_t(item.h) * p.q_head_stride;
      const Element* bq_base = static_cast<const Element*>(p.bias_q) + item.b * p.bq_batch_stride +
                               item.h * p.bq_head_stride;
      const Element* bk_base = static_cast<const Element*>(p.bias_k) + item.b * p.bk_batch_stride +
                               item.h * p.bk_head_stride;

      // Query tiles into buffer qb, once the consumers have finished the item that used it before.
      if (it >= kQBufs) Barrier::wait(&qempty_bar[qb], (it / kQBufs - 1) & 1);
      {  // the query plans are rebuilt per item: kept live, they would crowd the key-tile loop's registers
        const SwizzledRowPlan<128, 64, kDv, kVec, Element> plan_q(tidx, sQ0, q0, p.q_row_stride, D);
        const SwizzledFactorPlan<128, Traits::kMaxRank> plan_bq(tidx, D, R, p.bias_vec2, sQ0, kVec16 && p.bias_vec8);
        for (int c = 0; c < kConsumers; ++c) {
          const int r0 = item.m0 + 64 * c;
          const int valid = max(0, min(64, N - r0));
          plan_q.copy(sQ_at(qb, c), r0, valid, q_shift);
          plan_bq.copy<kUnrollFactors ? 64 : 0>(sQ_at(qb, c), bq_base + int64_t(r0) * p.bq_row_stride,
                                                p.bq_row_stride, valid, p.bias_vec2, p.bq_mult);
        }
      }
      if (!scale_q) {
        arrive_fill(&qfull_bar[qb]);
      } else {
        // The query rows are scaled in place once every producer thread's copies have landed. Waiting for all of this
        // thread's copies also waits for its last key-tile fills of the previous item, long in flight by now.
        dev::cp_async_commit();
        dev::cp_async_wait<0>();
        cutlass::arch::NamedBarrier::sync(128, 1);
        const int words = (D + R + 1) / 2;
        for (int c = 0; c < kConsumers; ++c) {
          Tensor sQ = make_tensor(make_smem_ptr(sQ_at(qb, c)), typename Traits::SmemLayoutQ{});
          const int valid = max(0, min(64, N - (item.m0 + 64 * c)));
          for (int i = tidx; i < valid * words; i += 128) {
            const int r = i / words, col = (i - r * words) * 2;
            const bool is_q = col < D;
            const float mult = is_q ? p.q_mult : p.bq_mult;
            // factor words copied by plain stores (odd rank / unaligned rows) were scaled on the way
            if (mult != 1.0f && (is_q || p.bias_vec2)) {
              uint32_t* word = reinterpret_cast<uint32_t*>(&sQ(r, col));
              *word = dev::Pack2<Element>::scale(*word, mult);
            }
          }
        }
        cutlass::arch::fence_view_async_shared();
        Barrier::arrive(&qfull_bar[qb]);
      }

      // Key tiles, the window's last (possibly partial) one first; a slot is refilled once every consumer warp has
      // released it.
      for (int j = 0; j < n_blocks; ++j, ++t) {
        const int slot = t % kStages;
        if (t >= kStages) Barrier::wait(&empty_bar[slot], ((t / kStages) - 1) & 1);
        const int n0 = (n_blocks - 1 - j) * kBlockN;
        const int valid = min(kBlockN, N - n0);
        plan_k.copy(sK_at(slot), n0, valid, kv_shift);
        plan_v.copy(sV_at(slot), n0, valid, v_shift);
        // unrolled factor copies (SwizzledFactorPlan::copy_full8): see RFSR_SM90WS_UNROLL_FACTORS_4B
        plan_bk.copy<kUnrollFactors ? kBlockN : 0>(sK_at(slot), bk_base + int64_t(n0) * p.bk_row_stride,
                                                   p.bk_row_stride, valid, p.bias_vec2, 1.0f);
        if (valid < kBlockN) {  // rows past N: zeros, not another window's keys
          plan_k.zero_tail(sK_at(slot), valid, k0);
          plan_v.zero_tail(sV_at(slot), valid, v0);
          plan_bk.zero_tail(sK_at(slot), bk_base, valid, kBlockN, p.bias_vec2);
        }
        arrive_fill(&full_bar[slot]);
      }
    }
    // Commit every group this thread has issued (the key-tile fills of every item, and the query copies of an item
    // without scaling, are never committed inside the loop): wait_group waits only committed groups.
    dev::cp_async_commit();
    dev::cp_async_wait<0>();  // nothing in flight when the producer warps exit
    return;
  }

  // ---- Consumers --------------------------------------------------------------------------------------------------
  if constexpr (Traits::kRealloc) cutlass::arch::warpgroup_reg_alloc<Traits::kConsumerRegs>();
  const int c = warpgroup - 1;
  const int lane = threadIdx.x % 32;

  typename Traits::TiledMmaS mma_s;
  typename Traits::TiledMmaO mma_o;
  auto thr_s = mma_s.get_thread_slice(tidx);
  auto thr_o = mma_o.get_thread_slice(tidx);
  Tensor acc_o = partition_fragment_C(mma_o, Shape<_64, Int<kDv>>{});

  Tensor cS = thr_s.partition_C(make_identity_tensor(Shape<_64, Int<kBlockN>>{}));
  Tensor cS_rc = make_tensor(cS.data(), rowcol_layout(cS.layout()));
  constexpr int kRows = decltype(size<0>(cS_rc))::value;
  float row_max[kRows], row_sum[kRows], corr[kRows];
  const float scale_log2 = p.scale_log2;

  auto wait_full = [&](int t) { Barrier::wait(&full_bar[t % kStages], (t / kStages) & 1); };
  // Hands the slot of tile t back to the producer: every wgmma of this warp that read it has retired.
  auto release = [&](int t) {
    if (lane == 0) Barrier::arrive(&empty_bar[t % kStages]);
  };
  auto softmax = [&](auto& acc, auto first) {
    constexpr bool kFirst = decltype(first)::value;
    Tensor S = make_tensor(acc.data(), rowcol_layout(acc.layout()));
    if (kFirst && n_blocks * kBlockN > N) {  // only an item's first tile (the window's last keys) can be partial
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
      if constexpr (kSumInO) {
        dev::row_exp2(S, mi, scale_log2, mx * scale_log2);
      } else {
        row_sum[mi] = row_sum[mi] * corr[mi] + dev::row_exp2_sum(S, mi, scale_log2, mx * scale_log2);
      }
    }
  };
  Tensor acc_s = partition_fragment_C(mma_s, Shape<_64, Int<kBlockN>>{});
  Tensor rP = make_tensor<Element>(acc_s.layout());
  Tensor tOrP = make_tensor(rP.data(), acc_as_a_layout(rP.layout()));
  auto convert_p = [&]() {
    constexpr int kN = decltype(size(acc_s))::value;
    cutlass::NumericArrayConverter<Element, float, kN> conv;
    *reinterpret_cast<cutlass::Array<Element, kN>*>(rP.data()) =
        conv(*reinterpret_cast<const cutlass::Array<float, kN>*>(acc_s.data()));
  };
  // Every tile (a warp vote that skipped it when no row max grew cost 2-4 %: fwd-ws-h200-2026-11-27.md, 6).
  auto rescale_o = [&]() {
    Tensor O = make_tensor(acc_o.data(), rowcol_layout(acc_o.layout()));
    CUTE_UNROLL
    for (int mi = 0; mi < kRows; ++mi) {
      CUTE_UNROLL
      for (int di = 0; di < size<1>(O); ++di) O(mi, di) *= corr[mi];
    }
  };
  auto issue_pv = [&](int t) {
    Tensor sVt = make_tensor(make_smem_ptr(sV_at(t % kStages)), typename Traits::SmemLayoutVt{});
    Tensor tOrVt = thr_o.make_fragment_B(thr_o.partition_B(sVt));
    warpgroup_fence_operand(acc_o);
    warpgroup_arrive();
    CUTE_UNROLL
    for (int kb = 0; kb < size<2>(tOrP); ++kb) {
      cute::gemm(mma_o, tOrP(_, _, kb), tOrVt(_, _, kb), acc_o);
    }
    warpgroup_commit_batch();
  };
  Tensor cO = thr_o.partition_C(make_identity_tensor(Shape<_64, Int<kDv>>{}));
  Tensor cO_rc = make_tensor(cO.data(), rowcol_layout(cO.layout()));

  int t = 0;  // key tiles consumed, in the producer's order
  int it = 0;
  for (int64_t w = blockIdx.x; w < items; w += gridDim.x, ++it) {
    const Item item = item_at(w);
    const int qb = it % kQBufs;
    Tensor sQ = make_tensor(make_smem_ptr(sQ_at(qb, c)), typename Traits::SmemLayoutQ{});
    Tensor tSrQ = thr_s.make_fragment_A(thr_s.partition_A(sQ));
    auto issue_s = [&](auto& acc, int tt) {
      Tensor sK = make_tensor(make_smem_ptr(sK_at(tt % kStages)), typename Traits::SmemLayoutK{});
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
    clear(acc_o);
    CUTE_UNROLL
    for (int i = 0; i < kRows; ++i) {
      row_max[i] = -INFINITY;
      row_sum[i] = 0.f;
    }

    Barrier::wait(&qfull_bar[qb], (it / kQBufs) & 1);
    wait_full(t);
    issue_s(acc_s, t);
    warpgroup_wait<0>();
    warpgroup_fence_operand(acc_s);
    softmax(acc_s, cute::true_type{});
    convert_p();  // O is still zero: no rescale

    // Step j: S(j + 1) and O += P(j) V(j) queued back to back; the softmax of S(j + 1) runs during the PV product,
    // whose operands it does not touch. After both retire, slot j (K(j) and V(j)) goes back to the producer.
    for (int j = 0; j + 1 < n_blocks; ++j) {
      wait_full(t + j + 1);
      issue_s(acc_s, t + j + 1);
      issue_pv(t + j);
      warpgroup_wait<1>();
      warpgroup_fence_operand(acc_s);
      softmax(acc_s, cute::false_type{});
      warpgroup_fence_operand(acc_s);
      warpgroup_wait<0>();
      warpgroup_fence_operand(acc_o);
      release(t + j);
      rescale_o();
      convert_p();
    }
    issue_pv(t + n_blocks - 1);
    warpgroup_wait<0>();
    warpgroup_fence_operand(acc_o);
    release(t + n_blocks - 1);  // the ring carries on into the next item
    if (lane == 0) Barrier::arrive(&qempty_bar[qb]);  // every S product of this item has retired
    t += n_blocks;

    // Epilogue: normalise, write out (4-byte stores: D is even) and lse, straight from the accumulators.
    Tensor O = make_tensor(acc_o.data(), rowcol_layout(acc_o.layout()));
    if constexpr (kSumInO) {  // the row sums are O's column D, held by one thread of each quad (the others pass 0)
      CUTE_UNROLL
      for (int mi = 0; mi < kRows; ++mi) {
        row_sum[mi] = 0.f;
        CUTE_UNROLL
        for (int di = 0; di < size<1>(O); ++di) {
          if (int(get<1>(cO_rc(mi, di))) == D) row_sum[mi] = O(mi, di);
        }
      }
    }
    dev::store_out_lse(O, cO_rc, row_max, row_sum, item.m0 + 64 * c, N, D,
                       static_cast<Element*>(p.out) + item.b * p.out_batch_stride + item.h * p.out_head_stride,
                       p.out_row_stride, p.lse + (int64_t(item.b) * p.H + item.h) * N, scale_log2);
  }
#else
  __trap();  // compiled for another architecture: never launched there (the binding checks the device)
#endif
}

template <class Traits>
cudaError_t launch_fwd_ws(const RfbiasFwdParams& p, cudaStream_t stream) {
  const int64_t m_blocks = (int64_t(p.N) + Traits::kBlockM - 1) / Traits::kBlockM;
  const int64_t items = m_blocks * p.B * p.H;
  if (items <= 0) return cudaSuccess;
  // Persistent CTAs: as many as are resident at once (kMinBlocks per SM), each walking items w, w + grid, ...
  int device = 0, sms = 0;
  cudaError_t e = cudaGetDevice(&device);
  if (e == cudaSuccess) e = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  if (e != cudaSuccess) return e;
  const int64_t grid = std::min<int64_t>(items, int64_t(sms) * Traits::kMinBlocks);
  auto kernel = p.qkv_vec16 ? &rfbias_fwd_ws_kernel<Traits, true> : &rfbias_fwd_ws_kernel<Traits, false>;
  e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Traits::kSmemBytes);
  if (e != cudaSuccess) return e;
  kernel<<<dim3(unsigned(grid)), dim3(Traits::kNThreads), Traits::kSmemBytes, stream>>>(p);
  return cudaGetLastError();
}

// p.sm90_variant 0 or 1: the configuration of FwdWsConfig. Builds with RFSR_SM90WS_VARIANTS defined also carry, for
// the SST-family buckets, the variants an A/B run compares in one build (the binding passes RFSR_SM90WS_VARIANT):
//   2: 64-key tiles, 4 stages; 3: two consumer warpgroups (128 query rows, 40 producer registers);
//   4: 64-key tiles at two CTAs per SM (registers moved to the consumers). Schedules that lost the A/B of 2026-11-27
//   and were removed (benchmarks/results/fwd-ws-h200-2026-11-27.md): pingpong of the consumers' GEMMs over named
//   barriers, every 4th or 8th exponential on the FMA pipe, and two P register buffers.
template <typename Element, int kDqk, int kDv>
cudaError_t run_fwd_ws(const RfbiasFwdParams& p, cudaStream_t stream) {
  // The 4-byte-word kernel keeps the row sums in V's first pad column: D < kDv (the binding copies rows with
  // D % 8 == 0 that are not 16-byte aligned, so they take the 16-byte kernel).
  if (!p.qkv_vec16 && p.D >= kDv) return cudaErrorInvalidValue;
#ifdef RFSR_SM90WS_VARIANTS
  if constexpr (kDqk <= 64 && kDv <= 32) {  // the SST-family buckets
    switch (p.sm90_variant) {
      case 2: return launch_fwd_ws<FwdWsTraits<Element, kDqk, kDv, 2, 64, 4, 1>>(p, stream);
      case 3: return launch_fwd_ws<FwdWsTraits<Element, kDqk, kDv, 2, 128, 3, 1, 40>>(p, stream);
      case 4: return launch_fwd_ws<FwdWsTraits<Element, kDqk, kDv, 2, 64, 3, 2, 40>>(p, stream);
      default: break;
    }
  }
#endif
  return launch_fwd_ws<typename FwdWsConfig<Element, kDqk, kDv>::Traits>(p, stream);
}

}  // namespace sm90
}  // namespace rfsr
