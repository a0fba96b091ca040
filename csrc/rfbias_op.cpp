// rfsr::flash_rfbias: the op schema (defined once, here), the composite entry point and the ATen kernels.
//
// The ATen kernels (the CPU implementation; the backward also serves CUDA inputs the fused backward does not
// cover) work over chunks of query rows, so memory stays O(rows_per_chunk * N) rather than O(N^2) per window. The
// forward hands each chunk to ATen's fused CPU attention with the factor product as an additive mask; the backward
// recomputes the probabilities from the saved log-sum-exp as the fused kernels do. The pure-PyTorch oracle for tests
// lives in rfsr_cuda.ops.reference.
#include <Python.h>

#include <ATen/ATen.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <tuple>

#include "rfbias_aten.h"
#include "rfbias_checks.h"

namespace rfsr {
namespace {

// Logits per step are at most this many elements (16 MiB in float32).
constexpr int64_t kChunkElems = int64_t(1) << 22;

struct Plan {
  int64_t batch_block;  // windows per step
  int64_t rows;         // query rows per step
};

Plan plan_chunks(const RfbiasShape& s) {
  const int64_t per_row = std::max<int64_t>(1, s.H * s.N);
  const int64_t rows = std::clamp<int64_t>(kChunkElems / per_row, 1, std::max<int64_t>(1, s.N));
  const int64_t batch_block = rows < s.N ? 1 : std::max<int64_t>(1, kChunkElems / (per_row * std::max<int64_t>(1, s.N)));
  return {batch_block, rows};
}

// The kernels compute in float32 (float64 for float64 inputs) whatever autocast is on: the ATen ops they call would
// otherwise run under the caller's autocast (bf16 matmuls, and a mask whose dtype no longer matches the queries).
struct NoAutocast {
  c10::impl::ExcludeDispatchKeyGuard guard{c10::autocast_dispatch_keyset};
};

at::ScalarType compute_dtype_for(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

// (B, N, H, X) -> (B, H, N, X) view in the compute dtype with a unit last-dim stride (a copy only when the dtype
// changes, or X = 1 came with another stride).
at::Tensor heads_first(const at::Tensor& t, at::ScalarType cd) {
  auto c = t.to(cd);
  if (c.size(-1) == 1 && c.stride(-1) != 1) c = c.contiguous();
  return c.permute({0, 2, 1, 3});
}

// Logits scale * q k^T + bq bk^T for windows [b0, b1) and query rows [n0, n1): (bb, H, rows, N).
at::Tensor logits_chunk(const at::Tensor& qh, const at::Tensor& kh, const at::Tensor& bq, const at::Tensor& bk,
                        const RfbiasShape& s, double scale, int64_t b0, int64_t b1, int64_t n0, int64_t n1) {
  auto qc = qh.slice(0, b0, b1).slice(2, n0, n1);
  auto logits = at::matmul(qc, kh.slice(0, b0, b1).transpose(-1, -2)).mul_(scale);
  if (s.R > 0) {
    auto bqc = s.bias_batched ? bq.slice(0, b0, b1).slice(2, n0, n1) : bq.slice(1, n0, n1);
    auto bkc = s.bias_batched ? bk.slice(0, b0, b1) : bk;
    logits.add_(at::matmul(bqc, bkc.transpose(-1, -2)));  // shared factors broadcast over windows
  }
  return logits;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> flash_rfbias_fwd_aten(const at::Tensor& q, const at::Tensor& k,
                                                        const at::Tensor& v, const at::Tensor& bias_q,
                                                        const at::Tensor& bias_k, double scale) {
  const RfbiasShape s = check_fwd_inputs(q, k, v, bias_q, bias_k);
  check_scale(scale);
  const NoAutocast no_autocast;
  const auto cd = compute_dtype_for(q.scalar_type());
  auto out = at::empty({s.B, s.N, s.H, s.D}, q.options());
  auto lse = at::empty({s.B, s.H, s.N}, q.options().dtype(lse_dtype_for(q.scalar_type())));
  if (s.B == 0 || s.N == 0 || s.H == 0) return {out, lse};

  // ATen's fused CPU attention (blocked online softmax over key blocks, multithreaded, and it returns the
  // log-sum-exp) takes the factor product as an additive mask. Only the mask rows of one chunk of queries exist at
  // a time, and with shared factors one chunk serves every window.
  const auto qh = heads_first(q, cd), kh = heads_first(k, cd), vh = heads_first(v, cd);
  const auto bq = bias_q.to(cd), bk = bias_k.to(cd);
  auto out_h = out.permute({0, 2, 1, 3});  // write through a view into the (B, N, H, D) result
  // Per-batch factors: the mask is (bb, H, rows, N), chunked as the backward's logits. Otherwise one call takes
  // every window, and the shared mask (1, H, rows, N), if any, bounds the rows.
  const Plan p = s.bias_batched
      ? plan_chunks(s)
      : Plan{s.B, std::clamp<int64_t>(kChunkElems / std::max<int64_t>(1, s.H * s.N), 1, s.N)};
  const bool has_bias = s.R > 0;
  for (int64_t n0 = 0; n0 < s.N; n0 += p.rows) {
    const int64_t n1 = std::min(s.N, n0 + p.rows);
    std::optional<at::Tensor> mask;
    if (has_bias && !s.bias_batched) mask = at::matmul(bq.slice(1, n0, n1), bk.transpose(-1, -2)).unsqueeze(0);
    for (int64_t b0 = 0; b0 < s.B; b0 += p.batch_block) {
      const int64_t b1 = std::min(s.B, b0 + p.batch_block);
      if (has_bias && s.bias_batched) {
        mask = at::matmul(bq.slice(0, b0, b1).slice(2, n0, n1), bk.slice(0, b0, b1).transpose(-1, -2));
      }
      auto [o, l] = at::_scaled_dot_product_flash_attention_for_cpu(
          qh.slice(0, b0, b1).slice(2, n0, n1), kh.slice(0, b0, b1), vh.slice(0, b0, b1), /*dropout_p=*/0.0,
          /*is_causal=*/false, mask, scale);
      out_h.slice(0, b0, b1).slice(2, n0, n1).copy_(o);
      lse.slice(0, b0, b1).slice(2, n0, n1).copy_(l);
    }
  }
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> flash_rfbias_bwd_aten(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& bias_q, const at::Tensor& bias_k, const at::Tensor& out, const at::Tensor& lse,
    double scale) {
  const RfbiasShape s = check_fwd_inputs(q, k, v, bias_q, bias_k);
  check_bwd_inputs(s, q, grad_out, out, lse);
  check_scale(scale);
  const NoAutocast no_autocast;
  const auto cd = compute_dtype_for(q.scalar_type());
  const auto opts = q.options().dtype(cd);
  auto dq = at::zeros({s.B, s.H, s.N, s.D}, opts);
  auto dk = at::zeros({s.B, s.H, s.N, s.D}, opts);
  auto dv = at::zeros({s.B, s.H, s.N, s.D}, opts);
  auto dbq = at::zeros(bias_q.sizes(), opts);
  auto dbk = at::zeros(bias_k.sizes(), opts);
  auto to_bnhd = [&](const at::Tensor& t) { return t.permute({0, 2, 1, 3}).to(q.scalar_type()).contiguous(); };
  if (s.B == 0 || s.N == 0 || s.H == 0) {
    return {to_bnhd(dq), to_bnhd(dk), to_bnhd(dv), dbq.to(bias_q.scalar_type()), dbk.to(bias_k.scalar_type())};
  }

  const auto qh = heads_first(q, cd), kh = heads_first(k, cd), vh = heads_first(v, cd);
  const auto doh = heads_first(grad_out, cd);
  const auto bq = bias_q.to(cd), bk = bias_k.to(cd);
  const auto lse_c = lse.to(cd);
  // delta = rowsum(dO * O): the softmax-Jacobian term shared by every key.
  const auto delta = (doh * heads_first(out, cd)).sum(-1);  // (B, H, N)
  const Plan p = plan_chunks(s);
  for (int64_t b0 = 0; b0 < s.B; b0 += p.batch_block) {
    const int64_t b1 = std::min(s.B, b0 + p.batch_block);
    for (int64_t n0 = 0; n0 < s.N; n0 += p.rows) {
      const int64_t n1 = std::min(s.N, n0 + p.rows);
      auto probs = logits_chunk(qh, kh, bq, bk, s, scale, b0, b1, n0, n1)
                       .sub_(lse_c.slice(0, b0, b1).slice(2, n0, n1).unsqueeze(-1))
                       .exp_();
      auto do_c = doh.slice(0, b0, b1).slice(2, n0, n1);
      dv.slice(0, b0, b1).add_(at::matmul(probs.transpose(-1, -2), do_c));
      auto dp = at::matmul(do_c, vh.slice(0, b0, b1).transpose(-1, -2));
      auto ds = probs.mul_(dp.sub_(delta.slice(0, b0, b1).slice(2, n0, n1).unsqueeze(-1)));  // dLogits
      dq.slice(0, b0, b1).slice(2, n0, n1).copy_(at::matmul(ds, kh.slice(0, b0, b1)).mul_(scale));
      dk.slice(0, b0, b1).add_(at::matmul(ds.transpose(-1, -2), qh.slice(0, b0, b1).slice(2, n0, n1)).mul_(scale));
      if (s.R > 0) {
        if (s.bias_batched) {
          dbq.slice(0, b0, b1).slice(2, n0, n1).copy_(at::matmul(ds, bk.slice(0, b0, b1)));
          dbk.slice(0, b0, b1).add_(at::matmul(ds.transpose(-1, -2), bq.slice(0, b0, b1).slice(2, n0, n1)));
        } else {
          // shared factors: the gradient is the sum over windows (fixed order); summing dLogits over the windows
          // of the chunk first leaves one product per chunk instead of one per window
          const auto ds_sum = ds.sum(0);  // (H, rows, N)
          dbq.slice(1, n0, n1).add_(at::matmul(ds_sum, bk));
          dbk.add_(at::matmul(ds_sum.transpose(-1, -2), bq.slice(1, n0, n1)));
        }
      }
    }
  }
  return {to_bnhd(dq), to_bnhd(dk), to_bnhd(dv), dbq.to(bias_q.scalar_type()), dbk.to(bias_k.scalar_type())};
}

namespace {

// The public entry point: resolves the default scale and calls the forward op, whose autograd formula is
// registered from Python (rfsr_cuda.ops), so torch.compile sees flash_rfbias_fwd.
at::Tensor flash_rfbias_composite(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                  const at::Tensor& bias_q, const at::Tensor& bias_k, std::optional<double> scale) {
  TORCH_CHECK_VALUE(q.dim() == 4, "q must be 4-D (B, N, H, D), got shape ", shape_str(q));
  const double s = scale.has_value() ? *scale : 1.0 / std::sqrt(static_cast<double>(q.size(3)));
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("rfsr::flash_rfbias_fwd", "")
                       .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                                 const at::Tensor&, const at::Tensor&,
                                                                 const at::Tensor&, double)>();
  return std::get<0>(op.call(q, k, v, bias_q, bias_k, s));
}

}  // namespace

TORCH_LIBRARY(rfsr, m) {
  m.def("flash_rfbias_fwd(Tensor q, Tensor k, Tensor v, Tensor bias_q, Tensor bias_k, float scale) "
        "-> (Tensor out, Tensor lse)");
  m.def("flash_rfbias_bwd(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor bias_q, Tensor bias_k, "
        "Tensor out, Tensor lse, float scale) "
        "-> (Tensor grad_q, Tensor grad_k, Tensor grad_v, Tensor grad_bias_q, Tensor grad_bias_k)");
  m.def("flash_rfbias(Tensor q, Tensor k, Tensor v, Tensor bias_q, Tensor bias_k, float? scale=None) -> Tensor");
}

TORCH_LIBRARY_IMPL(rfsr, CompositeImplicitAutograd, m) { m.impl("flash_rfbias", &flash_rfbias_composite); }

TORCH_LIBRARY_IMPL(rfsr, CPU, m) {
  m.impl("flash_rfbias_fwd", &flash_rfbias_fwd_aten);
  m.impl("flash_rfbias_bwd", &bwd_any_strides<&flash_rfbias_bwd_aten>);
}

#if defined(RFSR_WITH_CUDA) && !defined(RFSR_WITH_CUDA_BWD)
// Until the fused backward kernel is built, CUDA gradients come from the same chunked ATen code.
TORCH_LIBRARY_IMPL(rfsr, CUDA, m) { m.impl("flash_rfbias_bwd", &bwd_any_strides<&flash_rfbias_bwd_aten>); }
#endif

}  // namespace rfsr

// Importing rfsr_cuda._C loads this library, which runs the registrations above; the module itself is empty.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
