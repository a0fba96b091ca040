// Input validation shared by every backend of rfsr::flash_rfbias (CPU and CUDA).
// Errors are ValueError (shapes, strides, devices) or TypeError (dtypes) and name the argument.
#pragma once

#include <torch/library.h>
#include <ATen/ATen.h>

#include <cmath>
#include <string>
#include <tuple>

namespace rfsr {

struct RfbiasShape {
  int64_t B, N, H, D, R;
  bool bias_batched;  // factors are (B, H, N, R) rather than shared (H, N, R)
};

// Messages format numbers with std::to_string rather than stream inserters: streaming integers through c10::str
// instantiates std::ostream inserters in this library, which crashed on a machine whose compiler's libstdc++ differed
// from the one torch was built with.
inline std::string num(int64_t x) { return std::to_string(x); }

inline std::string list_str(at::IntArrayRef xs) {
  std::string s = "[";
  for (size_t i = 0; i < xs.size(); ++i) s += (i ? ", " : "") + std::to_string(xs[i]);
  return s + "]";
}

inline std::string shape_str(const at::Tensor& t) { return list_str(t.sizes()); }
inline std::string dev_str(const at::Tensor& t) { return t.device().str(); }
inline const char* dtype_str(const at::Tensor& t) { return c10::toString(t.scalar_type()); }

inline void check_last_dim_unit_stride(const at::Tensor& t, const char* name) {
  // A last dim of size <= 1 has no meaningful stride (R = 0 factors, D = 1).
  TORCH_CHECK_VALUE(t.size(-1) <= 1 || t.stride(-1) == 1, name,
                    " must have unit stride in its last dimension (got strides ", list_str(t.strides()),
                    "); other dimensions may be strided");
}

inline void check_same_device_dtype(const at::Tensor& ref, const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.device() == ref.device(), name, " is on ", dev_str(t), " but q is on ", dev_str(ref),
                    "; all inputs must be on one device");
  TORCH_CHECK_TYPE(t.scalar_type() == ref.scalar_type(), name, " has dtype ", dtype_str(t), " but q has ",
                   dtype_str(ref), "; all inputs must share one dtype (cast the factors to q's dtype)");
}

inline RfbiasShape check_fwd_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                    const at::Tensor& bias_q, const at::Tensor& bias_k) {
  TORCH_CHECK_TYPE(at::isFloatingType(q.scalar_type()), "q must be a floating-point tensor, got ",
                   dtype_str(q));
  TORCH_CHECK_VALUE(q.dim() == 4, "q must be 4-D (B, N, H, D), got shape ", shape_str(q));
  RfbiasShape s{};
  s.B = q.size(0); s.N = q.size(1); s.H = q.size(2); s.D = q.size(3);
  TORCH_CHECK_VALUE(s.D > 0, "q must have a head dim D > 0, got shape ", shape_str(q));
  TORCH_CHECK_VALUE(k.dim() == 4 && k.sizes() == q.sizes(), "k must have the shape of q (B, N, H, D) = ",
                    shape_str(q), ", got ", shape_str(k));
  TORCH_CHECK_VALUE(v.dim() == 4 && v.sizes() == q.sizes(), "v must have the shape of q (B, N, H, D) = ",
                    shape_str(q), ", got ", shape_str(v));
  const std::string expect = "(H, N, R) = (" + num(s.H) + ", " + num(s.N) + ", R) or (B, H, N, R) = (" + num(s.B) +
                             ", " + num(s.H) + ", " + num(s.N) + ", R)";
  TORCH_CHECK_VALUE(bias_q.dim() == 3 || bias_q.dim() == 4, "bias_q must be ", expect, ", got shape ",
                    shape_str(bias_q));
  s.bias_batched = bias_q.dim() == 4;
  s.R = bias_q.size(-1);
  const bool q_ok = s.bias_batched
      ? (bias_q.size(0) == s.B && bias_q.size(1) == s.H && bias_q.size(2) == s.N)
      : (bias_q.size(0) == s.H && bias_q.size(1) == s.N);
  TORCH_CHECK_VALUE(q_ok, "bias_q must be ", expect, " for q of shape ", shape_str(q), ", got ",
                    shape_str(bias_q));
  TORCH_CHECK_VALUE(bias_k.sizes() == bias_q.sizes(), "bias_k must have the shape of bias_q ", shape_str(bias_q),
                    ", got ", shape_str(bias_k));
  check_same_device_dtype(q, k, "k");
  check_same_device_dtype(q, v, "v");
  check_same_device_dtype(q, bias_q, "bias_q");
  check_same_device_dtype(q, bias_k, "bias_k");
  check_last_dim_unit_stride(q, "q");
  check_last_dim_unit_stride(k, "k");
  check_last_dim_unit_stride(v, "v");
  check_last_dim_unit_stride(bias_q, "bias_q");
  check_last_dim_unit_stride(bias_k, "bias_k");
  return s;
}

inline void check_scale(double scale) {
  TORCH_CHECK_VALUE(std::isfinite(scale), "scale must be a finite number, got ", std::to_string(scale));
}

inline at::ScalarType lse_dtype_for(at::ScalarType t) {
  // float64 inputs keep float64 statistics so gradcheck sees exact values; everything else uses float32.
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

inline void check_bwd_inputs(const RfbiasShape& s, const at::Tensor& q, const at::Tensor& grad_out,
                             const at::Tensor& out, const at::Tensor& lse) {
  TORCH_CHECK_VALUE(grad_out.sizes() == q.sizes(), "grad_out must have the shape of q ", shape_str(q), ", got ",
                    shape_str(grad_out));
  TORCH_CHECK_VALUE(out.sizes() == q.sizes(), "out must have the shape of q ", shape_str(q), ", got ",
                    shape_str(out));
  check_same_device_dtype(q, grad_out, "grad_out");
  check_same_device_dtype(q, out, "out");
  check_last_dim_unit_stride(grad_out, "grad_out");
  check_last_dim_unit_stride(out, "out");
  TORCH_CHECK_VALUE(lse.dim() == 3 && lse.size(0) == s.B && lse.size(1) == s.H && lse.size(2) == s.N,
                    "lse must be (B, H, N) = (", num(s.B), ", ", num(s.H), ", ", num(s.N), "), got shape ",
                    shape_str(lse));
  TORCH_CHECK_VALUE(lse.device() == q.device(), "lse is on ", dev_str(lse), " but q is on ", dev_str(q));
  TORCH_CHECK_TYPE(lse.scalar_type() == lse_dtype_for(q.scalar_type()), "lse must have dtype ",
                   c10::toString(lse_dtype_for(q.scalar_type())), " for ", dtype_str(q), " inputs, got ",
                   dtype_str(lse));
}

// The backward takes its inputs with any strides. They are mostly tensors autograd saved, and torch.compile may
// hand those back re-strided (inductor's layout optimisation lays 4-D activations out channels-last), so a user
// cannot be asked to fix them. The kernels need a unit last-dim stride: copy only where it is missing.
inline at::Tensor with_unit_last_stride(const at::Tensor& t) {
  return (t.dim() == 0 || t.size(-1) <= 1 || t.stride(-1) == 1) ? t : t.contiguous();
}

using BwdResult = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
using BwdFn = BwdResult (*)(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                            const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, double);

// The registered flash_rfbias_bwd of a device: Fn on unit-last-stride inputs.
template <BwdFn Fn>
BwdResult bwd_any_strides(const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                          const at::Tensor& bias_q, const at::Tensor& bias_k, const at::Tensor& out,
                          const at::Tensor& lse, double scale) {
  return Fn(with_unit_last_stride(grad_out), with_unit_last_stride(q), with_unit_last_stride(k),
            with_unit_last_stride(v), with_unit_last_stride(bias_q), with_unit_last_stride(bias_k),
            with_unit_last_stride(out), with_unit_last_stride(lse), scale);
}

}  // namespace rfsr
