// CUDA implementation of rfsr::flash_rfbias_bwd: argument checks, output/workspace allocation, and dispatch to the
// compiled (dtype, Dqk, Dv) backward kernels (csrc/rfbias/sm80/launch_bwd.h). Inputs the fused kernels do not take
// (float32/float64, odd or large head dims, ranks > 128, pre-sm80 devices, buckets left out of the build) go to
// the chunked ATen implementation, so the op always returns a gradient.
//
// The CUDA registration is compiled only when RFSR_WITH_CUDA_BWD is defined (for this file and csrc/rfbias_op.cpp,
// which then drops its ATen registration for the CUDA backward); otherwise the ATen fallback stays registered.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <climits>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <string>
#include <tuple>

#include "rfbias_aten.h"
#include "rfbias_checks.h"
#include "rfbias_cuda_common.h"
#include "rfbias/params_bwd.h"
#include "rfbias/instantiations/dispatch_bwd.h"

namespace rfsr {
namespace {

// The forward's placement of the softmax scale (rfbias_fold_scale, params.h), so the recomputed scores match the
// saved lse; the logits are c * X with c = scale_log2 / log2(e), which is the dbias_k multiplier.
void fold_scale_bwd(RfbiasBwdParams& p, double scale) {
  constexpr double kLog2e = 1.4426950408889634;
  rfbias_fold_scale(scale, p.q_mult, p.bq_mult, p.scale_log2);
  p.c_mult = static_cast<float>(static_cast<double>(p.scale_log2) / kLog2e);
  p.scale = static_cast<float>(scale);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> flash_rfbias_bwd_cuda(
    const at::Tensor& grad_out_in, const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
    const at::Tensor& bias_q_in, const at::Tensor& bias_k_in, const at::Tensor& out_in, const at::Tensor& lse_in,
    double scale) {
  const RfbiasShape s = check_fwd_inputs(q_in, k_in, v_in, bias_q_in, bias_k_in);
  check_bwd_inputs(s, q_in, grad_out_in, out_in, lse_in);
  check_scale(scale);
  TORCH_CHECK_VALUE(q_in.is_cuda(), "q must be a CUDA tensor for the CUDA kernel, got ", dev_str(q_in));

  c10::cuda::CUDAGuard guard(q_in.device());
  const auto st = q_in.scalar_type();
  const cudaDeviceProp* prop = at::cuda::getCurrentDeviceProperties();
  const int arch = prop->major * 10 + prop->minor;
  const RfbiasDtype dtype = st == at::kHalf ? RfbiasDtype::kFloat16 : RfbiasDtype::kBFloat16;
  const bool fused_ok = (st == at::kHalf || st == at::kBFloat16) && s.D % 2 == 0 && s.D <= kCudaMaxHeadDim &&
                        s.R <= kCudaMaxRank && s.N <= INT_MAX / 2 && s.B <= INT_MAX && s.H <= INT_MAX && arch >= 80;
  int count = 0;
  const RfbiasBwdKernel* table = rfbias_bwd_kernels(&count);
  const RfbiasBwdKernel* kernel = fused_ok ? pick_kernel(table, count, dtype, s.D, s.R, arch) : nullptr;
  if (kernel == nullptr) {
    return flash_rfbias_bwd_aten(grad_out_in, q_in, k_in, v_in, bias_q_in, bias_k_in, out_in, lse_in, scale);
  }

  at::Tensor dq = at::empty({s.B, s.N, s.H, s.D}, q_in.options());
  at::Tensor dk = at::empty({s.B, s.N, s.H, s.D}, q_in.options());
  at::Tensor dv = at::empty({s.B, s.N, s.H, s.D}, q_in.options());
  at::Tensor dbq = at::zeros(bias_q_in.sizes(), bias_q_in.options());  // contiguous; zero when B == 0
  at::Tensor dbk = at::zeros(bias_k_in.sizes(), bias_k_in.options());
  if (s.B == 0 || s.N == 0 || s.H == 0) return {dq, dk, dv, dbq, dbk};

  // Rows must be 4-byte addressable (an odd element offset or stride is copied once).
  auto rows4 = [](const at::Tensor& t) { return is_aligned(t, 4) ? t : t.contiguous(); };
  const at::Tensor q = rows4(q_in), k = rows4(k_in), v = rows4(v_in);
  const at::Tensor dout = rows4(grad_out_in), out = rows4(out_in);
  const at::Tensor lse = lse_in.contiguous();
  const at::Tensor bias_q = s.R > 0 ? bias_q_in : q, bias_k = s.R > 0 ? bias_k_in : q;

  // Workspace: delta and lse2 (2, B, H, N); the pre-scaled bias_q; factor-gradient partials, one row set per
  // window (per-window factors) or per chunk of windows (shared factors, see rfbias_bwd_chunking).
  int chunk_windows = 1, n_chunks = 0;
  rfbias_bwd_chunking(s.B, s.H, s.N, chunk_windows, n_chunks);
  const int64_t parts = s.R == 0 ? 0 : (s.bias_batched ? s.B : n_chunks);
  const auto fopts = q.options().dtype(at::kFloat);
  at::Tensor stats = at::empty({2, s.B, s.H, s.N}, fopts);
  at::Tensor bq_scaled = at::empty({s.R > 0 ? (s.bias_batched ? s.B : 1) : 0, s.H, s.N, s.R}, q.options());
  at::Tensor dbq_part = at::empty({parts, s.H, s.N, s.R}, fopts);
  at::Tensor dbk_part = at::empty({parts, s.H, s.N, s.R}, fopts);

  RfbiasBwdParams p{};
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.dout = dout.data_ptr();
  p.out = out.data_ptr();
  p.bias_q = bias_q.data_ptr();
  p.bias_k = bias_k.data_ptr();
  p.lse = lse.data_ptr<float>();
  p.dq = dq.data_ptr();
  p.dk = dk.data_ptr();
  p.dv = dv.data_ptr();
  p.delta = stats[0].data_ptr<float>();
  p.lse2 = stats[1].data_ptr<float>();
  p.bq_scaled = bq_scaled.data_ptr();
  p.dbq_part = dbq_part.data_ptr<float>();
  p.dbk_part = dbk_part.data_ptr<float>();
  p.dbq = dbq.data_ptr();
  p.dbk = dbk.data_ptr();
  set_shape_and_input_strides(p, s, q, k, v, bias_q, bias_k);
  p.do_batch_stride = dout.stride(0); p.do_row_stride = dout.stride(1); p.do_head_stride = dout.stride(2);
  p.o_batch_stride = out.stride(0); p.o_row_stride = out.stride(1); p.o_head_stride = out.stride(2);
  p.bias_batched = s.bias_batched;
  p.chunk_windows = chunk_windows;
  p.n_chunks = n_chunks;
  fold_scale_bwd(p, scale);
  p.qkv_vec16 = s.D % 8 == 0 && is_aligned(q, 16) && is_aligned(k, 16) && is_aligned(v, 16) &&
                is_aligned(dout, 16);
  p.bias_vec2 = s.R > 0 && s.R % 2 == 0 && is_aligned(bias_k, 4);
  p.bqs_vec2 = s.R > 0 && s.R % 2 == 0;
  // RFSR_BWD_PATH=sm90: the wgmma dK/dV and dQ kernels (sm90/bwd_kernel.h), an experiment; they exist only in
  // builds with RFSR_NVCC_FLAGS=-DRFSR_SM90_BWD and run only on 9.x devices. A request that cannot be met is an
  // error rather than a silent fallback.
  const char* path_env = std::getenv("RFSR_BWD_PATH");
  const std::string path = path_env != nullptr ? std::string(path_env) : std::string();
  TORCH_CHECK_VALUE(path.empty() || path == "sm80" || path == "sm90",
                    "RFSR_BWD_PATH must be sm80 or sm90 (or unset), got '", path, "'");
  p.sm90 = path == "sm90";
  TORCH_CHECK_VALUE(!p.sm90 || arch / 10 == 9, "RFSR_BWD_PATH=sm90 needs compute capability 9.x; device ",
                    dev_str(q_in), " (", prop->name, ") is ", num(prop->major), ".", num(prop->minor));

  if (s.R > 0) {
    const cudaError_t err = scale_factor_into(bias_q, bq_scaled, p.bq_mult, at::cuda::getCurrentCUDAStream());
    TORCH_CHECK(err == cudaSuccess, "flash_rfbias_bwd: scaling bias_q failed: ", cudaGetErrorString(err));
  }
  const cudaError_t err = kernel->run(p, at::cuda::getCurrentCUDAStream());
  TORCH_CHECK_VALUE(!(p.sm90 && err == cudaErrorNotSupported), "RFSR_BWD_PATH=sm90: this build has no wgmma "
                    "backward kernels (build with RFSR_NVCC_FLAGS=-DRFSR_SM90_BWD)");
  TORCH_CHECK(err == cudaSuccess, "flash_rfbias_bwd: launching ", kernel->name, " failed: ", cudaGetErrorString(err));
  return {dq, dk, dv, dbq, dbk};
}

#if defined(RFSR_WITH_CUDA_BWD)
TORCH_LIBRARY_IMPL(rfsr, CUDA, m) { m.impl("flash_rfbias_bwd", &bwd_any_strides<&flash_rfbias_bwd_cuda>); }
#endif

}  // namespace rfsr
