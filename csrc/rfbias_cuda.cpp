// CUDA implementation of rfsr::flash_rfbias_fwd: argument checks, output allocation, and dispatch to the
// compiled (dtype, Dqk, Dv) kernel. The only CUDA-side file that sees ATen; kernels get a POD params struct.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <climits>
#include <cstdlib>
#include <cmath>
#include <cstdint>
#include <string>
#include <tuple>

#include "rfbias_checks.h"
#include "rfbias_cuda_common.h"
#include "rfbias/params.h"
#include "rfbias/instantiations/dispatch.h"

namespace rfsr {
namespace {

// Smallest window (N) from which the unforced op runs the wgmma kernel on a 9.x device. Measured per shape with
// benchmarks/bench_fwd_paths.py on an H100 and an H200 (benchmarks/results/fwd-dispatch-2026-11-28.md): with a
// pre-scaled factor it wins from N = 576 where rows are 16-byte vectors or Dqk is 64, and loses up to N = 1024 with
// 4-byte rows in the Dqk = 48 bucket (copy-bound: 5-7 %). N = 256 (two 192-row items, a third of the rows idle)
// stays on sm80. Without the pre-scaling the per-item rescale makes small windows slower (the 2048 of before).
int64_t wgmma_min_n(int dqk, bool rows16, bool factor_prescaled) {
  if (!factor_prescaled) return 2048;
  if (rows16 || dqk >= 64) return 512;
  return 1536;
}

std::tuple<at::Tensor, at::Tensor> flash_rfbias_fwd_cuda(const at::Tensor& q_in, const at::Tensor& k_in,
                                                         const at::Tensor& v_in, const at::Tensor& bias_q,
                                                         const at::Tensor& bias_k, double scale) {
  const RfbiasShape s = check_fwd_inputs(q_in, k_in, v_in, bias_q, bias_k);
  check_scale(scale);
  TORCH_CHECK_VALUE(q_in.is_cuda(), "q must be a CUDA tensor for the CUDA kernel, got ", dev_str(q_in));
  const auto st = q_in.scalar_type();
  TORCH_CHECK_TYPE(st == at::kHalf || st == at::kBFloat16,
                   "flash_rfbias on CUDA supports float16 and bfloat16 inputs; q, k, v, bias_q and bias_k have dtype ",
                   dtype_str(q_in), ". Cast them first, e.g. q.to(torch.bfloat16) (the CPU op accepts float32/float64)");
  TORCH_CHECK_VALUE(s.D % 2 == 0, "q: the CUDA kernel needs an even head dim D (rows of whole 4-byte words), got D=",
                    num(s.D));
  TORCH_CHECK_VALUE(s.D <= kCudaMaxHeadDim, "q: the CUDA kernel supports head dims D <= ", num(kCudaMaxHeadDim), ", got D=",
                    num(s.D));
  TORCH_CHECK_VALUE(s.R <= kCudaMaxRank, "bias_q: the CUDA kernel supports ranks R <= ", num(kCudaMaxRank), ", got R=",
                    num(s.R));
  TORCH_CHECK_VALUE(s.N <= INT_MAX / 2 && s.B <= INT_MAX && s.H <= INT_MAX,
                    "q: sizes too large for the CUDA kernel, got shape ", shape_str(q_in));

  c10::cuda::CUDAGuard guard(q_in.device());
  const cudaDeviceProp* prop = at::cuda::getCurrentDeviceProperties();
  const int arch = prop->major * 10 + prop->minor;
  TORCH_CHECK_VALUE(arch >= 80, "flash_rfbias on CUDA needs compute capability 8.0 or newer; device ",
                    dev_str(q_in), " (", prop->name, ") is ", num(prop->major), ".", num(prop->minor));

  const RfbiasDtype dtype = st == at::kHalf ? RfbiasDtype::kFloat16 : RfbiasDtype::kBFloat16;
  int count = 0;
  const RfbiasFwdKernel* table = rfbias_fwd_kernels(&count);
  // Kernel path. The sm80 (mma.sync) kernels run everywhere. On 9.x devices the warp-specialised wgmma kernel
  // (sm90/fwd_ws_kernel.h) takes the narrow buckets (Dqk <= 64, Dv <= 32) from the window size where it measured
  // faster (wgmma_min_n below); elsewhere sm80 stays the default.
  // RFSR_FWD_PATH=sm80|sm90 forces a path: a request that cannot be met is an error rather than a silent fallback.
  const char* path_env = std::getenv("RFSR_FWD_PATH");
  const std::string path = path_env != nullptr ? std::string(path_env) : std::string();
  TORCH_CHECK_VALUE(path.empty() || path == "sm80" || path == "sm90",
                    "RFSR_FWD_PATH must be sm80 or sm90 (or unset), got '", path, "'");
  const RfbiasFwdKernel* kernel = pick_kernel(table, count, dtype, s.D, s.R, arch, path == "sm90" ? 90 : 80);
  TORCH_CHECK_VALUE(kernel != nullptr, "flash_rfbias: no CUDA kernel compiled for dtype ", dtype_str(q_in), ", D=", num(s.D), ", R=",
                    num(s.R), " (this build selected a subset with RFSR_KERNELS; rebuild with RFSR_KERNELS unset)");
  TORCH_CHECK_VALUE(path != "sm90" || kernel->min_arch == 90, "RFSR_FWD_PATH=sm90: no wgmma kernel for dtype ",
                    dtype_str(q_in), ", D=", num(s.D), ", R=", num(s.R), " on device ", dev_str(q_in), " (", prop->name,
                    "): it needs compute capability 9.x and a build that includes the sm90 kernels");
  float q_mult = 1.f, bq_mult = 1.f, scale_log2 = 1.f;
  rfbias_fold_scale(scale, q_mult, bq_mult, scale_log2);
  // With the usual scales a shared factor is scaled once per call for the wgmma kernel (below); otherwise its
  // producer rescales every query tile, which costs most on small windows.
  const bool factor_prescaled = q_mult == 1.f && (s.R == 0 || bq_mult == 1.f || !s.bias_batched);
  const bool rows16 = s.D % 8 == 0 && is_aligned(q_in, 16) && is_aligned(k_in, 16) && is_aligned(v_in, 16);
  if (path.empty() && arch / 10 == 9 && s.N >= wgmma_min_n(kernel->dqk, rows16, factor_prescaled)) {
    const RfbiasFwdKernel* wgmma = pick_kernel(table, count, dtype, s.D, s.R, arch, 90);
    if (wgmma != nullptr && wgmma->min_arch == 90 && wgmma->dqk == kernel->dqk && wgmma->dv == kernel->dv &&
        wgmma->dqk <= 64 && wgmma->dv <= 32) {
      kernel = wgmma;
    }
  }

  const bool empty = s.B == 0 || s.N == 0 || s.H == 0;
  const bool wgmma_kernel = kernel->min_arch == 90;
  // The wgmma kernel's producer scales the staged query tiles in place when a multiplier is not 1: per work item a wait
  // for all of its copies, a barrier and a pass over every query word (moving that pass to the consumers was slower
  // still: benchmarks/results/fwd-ws-h200-2026-11-28.md). With the usual folding (q_mult = 1, bq_mult = 1 / scale) only
  // the factor needs it; a shared factor is scaled here once per call instead, with the kernel's float32 multiply and
  // single rounding (the backward's scaled-factor kernel), so the logits are bit for bit the same. The scaled factor
  // (H * N * R elements) is the call's one temporary.
  at::Tensor bq = bias_q;
  if (!empty && wgmma_kernel && s.R > 0 && !s.bias_batched && q_mult == 1.f && bq_mult != 1.f) {
    bq = at::empty(bias_q.sizes(), bias_q.options());
    const cudaError_t err = scale_factor_into(bias_q, bq, bq_mult, at::cuda::getCurrentCUDAStream());
    TORCH_CHECK(err == cudaSuccess, "flash_rfbias: scaling bias_q failed: ", cudaGetErrorString(err));
    bq_mult = 1.f;
  }

  at::Tensor out = at::empty({s.B, s.N, s.H, s.D}, q_in.options());
  at::Tensor lse = at::empty({s.B, s.H, s.N}, q_in.options().dtype(at::kFloat));
  if (empty) return {out, lse};

  // Rows must be 4-byte addressable; anything coarser picks the 16-byte path, anything finer (an odd element
  // offset or stride, which a rearranged view of a 4-byte-aligned buffer never has) is copied once. The wgmma
  // kernel's 4-byte path needs a pad column in V (D < its Dv bucket), so there rows with D = Dv that are not 16-byte
  // aligned are copied once as well (a fresh contiguous tensor is).
  auto rows = [&](const at::Tensor& t) {
    if (wgmma_kernel && s.D >= kernel->dv && !is_aligned(t, 16)) return t.clone(at::MemoryFormat::Contiguous);
    return is_aligned(t, 4) ? t : t.contiguous();
  };
  const at::Tensor q = rows(q_in), k = rows(k_in), v = rows(v_in);

  RfbiasFwdParams p{};
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.bias_q = s.R > 0 ? bq.data_ptr() : q.data_ptr();
  p.bias_k = s.R > 0 ? bias_k.data_ptr() : q.data_ptr();
  p.out = out.data_ptr();
  p.lse = lse.data_ptr<float>();
  set_shape_and_input_strides(p, s, q, k, v, bq, bias_k);
  p.out_batch_stride = out.stride(0); p.out_row_stride = out.stride(1); p.out_head_stride = out.stride(2);
  p.q_mult = q_mult;
  p.bq_mult = bq_mult;
  p.scale_log2 = scale_log2;
  p.qkv_vec16 = s.D % 8 == 0 && is_aligned(q, 16) && is_aligned(k, 16) && is_aligned(v, 16);
  p.bias_vec2 = s.R > 0 && s.R % 2 == 0 && is_aligned(bq, 4) && is_aligned(bias_k, 4);
  p.bias_vec8 = p.bias_vec2 && s.D % 8 == 0 && s.R % 8 == 0 && is_aligned(bq, 16) && is_aligned(bias_k, 16);
  if (path == "sm90") {  // RFSR_SM90WS_VARIANT picks a tile variant of experiment builds (sm90/fwd_ws_kernel.h)
    const char* variant = std::getenv("RFSR_SM90WS_VARIANT");
    p.sm90_variant = variant != nullptr ? std::max(1, std::atoi(variant)) : 1;
  }

  const cudaError_t err = kernel->run(p, at::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "flash_rfbias: launching ", kernel->name, " failed: ", cudaGetErrorString(err));
  return {out, lse};
}

}  // namespace

TORCH_LIBRARY_IMPL(rfsr, CUDA, m) { m.impl("flash_rfbias_fwd", &flash_rfbias_fwd_cuda); }

}  // namespace rfsr
