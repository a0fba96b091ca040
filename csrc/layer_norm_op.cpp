// rfsr::layer_norm and rfsr::add_layer_norm: the schemas, the input checks and the ATen implementation (the CPU
// kernel). LayerNorm over the last dim, optionally of a residual sum, into rows padded with zero columns to `width`
// (SST's inference path: GEMMs that follow then read 16-byte-aligned rows; see rfsr_cuda.nn.layers.LayerNorm2d).
#include <torch/library.h>

#include <c10/core/impl/LocalDispatchKeySet.h>

#include <cmath>

#include "layer_norm_op.h"
#include "rfbias_checks.h"  // num, shape_str, dtype_str, dev_str

namespace rfsr {

int64_t check_layer_norm_inputs(const at::Tensor& x, const std::optional<at::Tensor>& y, const at::Tensor& weight,
                                const at::Tensor& bias, double eps, int64_t width, std::optional<int64_t> norm_cols) {
  TORCH_CHECK_TYPE(at::isFloatingType(x.scalar_type()), "x must be a floating-point tensor, got ", dtype_str(x));
  TORCH_CHECK_VALUE(x.dim() >= 1 && x.size(-1) >= 1, "x must have a non-empty last dim (the normalised one), got shape ",
                    shape_str(x));
  const int64_t C = x.size(-1);
  if (y.has_value()) {
    TORCH_CHECK_VALUE(y->sizes() == x.sizes(), "residual must have the shape of x ", shape_str(x), ", got ",
                      shape_str(*y));
    TORCH_CHECK_VALUE(y->device() == x.device(), "residual is on ", dev_str(*y), " but x is on ", dev_str(x));
    TORCH_CHECK_TYPE(y->scalar_type() == x.scalar_type(), "residual has dtype ", dtype_str(*y), " but x has ",
                     dtype_str(x), "; they must match");
  }
  for (const auto& [t, name] : {std::pair<const at::Tensor&, const char*>{weight, "weight"}, {bias, "bias"}}) {
    TORCH_CHECK_VALUE(t.dim() == 1 && t.size(0) == C, name, " must have shape [", num(C), "] (x's last dim), got ",
                      shape_str(t));
    TORCH_CHECK_VALUE(t.device() == x.device(), name, " is on ", dev_str(t), " but x is on ", dev_str(x));
    TORCH_CHECK_TYPE(at::isFloatingType(t.scalar_type()), name, " must be floating-point, got ", dtype_str(t));
  }
  TORCH_CHECK_VALUE(std::isfinite(eps) && eps >= 0.0, "eps must be a finite number >= 0, got ", std::to_string(eps));
  TORCH_CHECK_VALUE(width >= C, "width must be >= x's last dim ", num(C), " (extra columns are zero), got ", num(width));
  const int64_t n = norm_cols.value_or(C);
  TORCH_CHECK_VALUE(n >= 1 && n <= C, "norm_cols must be between 1 and x's last dim ", num(C), ", got ", num(n));
  return n;
}

std::tuple<at::Tensor, at::Tensor> layer_norm_aten(const at::Tensor& x, const std::optional<at::Tensor>& y,
                                                   const at::Tensor& weight, const at::Tensor& bias, double eps,
                                                   int64_t width, std::optional<int64_t> norm_cols) {
  const int64_t n_stat = check_layer_norm_inputs(x, y, weight, bias, eps, width, norm_cols);
  const int64_t C = x.size(-1);
  // float32 statistics (float64 for float64 inputs) whatever autocast is on
  const c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  const auto cd = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor sum;
  if (y.has_value()) sum = at::add(x, *y).contiguous();  // rounded to x's dtype, then normalised
  const at::Tensor& s = y.has_value() ? sum : x;
  at::Tensor n;
  if (n_stat == C) {
    n = at::layer_norm(s.to(cd), {C}, weight.to(cd), bias.to(cd), eps).to(x.scalar_type());
  } else {  // statistics of a prefix (the real channels of a zero-padded row), applied to every column
    const at::Tensor sc = s.to(cd), head = sc.narrow(-1, 0, n_stat);
    const at::Tensor mean = head.mean(-1, true);
    const at::Tensor rstd = at::rsqrt((head - mean).square().mean(-1, true) + eps);
    n = ((sc - mean) * rstd * weight.to(cd) + bias.to(cd)).to(x.scalar_type());
  }
  if (width == C) return {n.contiguous(), sum};
  auto sizes = x.sizes().vec();
  sizes.back() = width;
  at::Tensor out = at::zeros(sizes, x.options().memory_format(at::MemoryFormat::Contiguous));
  out.narrow(-1, 0, C).copy_(n);
  return {out, sum};
}

TORCH_LIBRARY_FRAGMENT(rfsr, m) {
  m.def("layer_norm(Tensor x, Tensor weight, Tensor bias, float eps, int width, int? norm_cols=None) -> Tensor");
  m.def("add_layer_norm(Tensor x, Tensor residual, Tensor weight, Tensor bias, float eps, int width, "
        "int? norm_cols=None) -> (Tensor out, Tensor sum)");
}

TORCH_LIBRARY_IMPL(rfsr, CPU, m) {
  m.impl("layer_norm", &layer_norm_entry<&layer_norm_aten>);
  m.impl("add_layer_norm", &add_layer_norm_entry<&layer_norm_aten>);
}

}  // namespace rfsr
