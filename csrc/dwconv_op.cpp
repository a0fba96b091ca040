// rfsr::depthwise_conv3x3: the schema, the input checks and the ATen implementation (the CPU kernel).
// out = act(depthwise 3x3 conv of x with zero padding 1 + bias) [+ x], act the identity or the exact GELU: SST's
// FFN (x + gelu(dwc(x))) and gate (dwc(x)) convs in one op, so the CUDA kernel can write each output once.
#include <torch/library.h>

#include <c10/core/impl/LocalDispatchKeySet.h>

#include "dwconv_op.h"
#include "rfbias_checks.h"  // num, shape_str, dtype_str, dev_str

namespace rfsr {

void check_dwconv_inputs(const at::Tensor& x, const at::Tensor& taps, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK_TYPE(at::isFloatingType(x.scalar_type()), "x must be a floating-point tensor, got ", dtype_str(x));
  TORCH_CHECK_VALUE(x.dim() == 4, "x must be 4-D (B, C, H, W), got shape ", shape_str(x));
  const int64_t C = x.size(1);
  TORCH_CHECK_VALUE(taps.dim() == 3 && taps.size(0) == 3 && taps.size(1) == 3 && taps.size(2) == C,
                    "taps must have shape [3, 3, ", num(C), "] (a conv weight (C, 1, 3, 3) permuted to (3, 3, C)), got ",
                    shape_str(taps));
  TORCH_CHECK_VALUE(taps.device() == x.device(), "taps is on ", dev_str(taps), " but x is on ", dev_str(x));
  TORCH_CHECK_TYPE(at::isFloatingType(taps.scalar_type()), "taps must be floating-point, got ", dtype_str(taps));
  if (bias.has_value()) {
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == C, "bias must have shape [", num(C), "], got ",
                      shape_str(*bias));
    TORCH_CHECK_VALUE(bias->device() == x.device(), "bias is on ", dev_str(*bias), " but x is on ", dev_str(x));
    TORCH_CHECK_TYPE(at::isFloatingType(bias->scalar_type()), "bias must be floating-point, got ", dtype_str(*bias));
  }
}

at::Tensor dwconv_aten(const at::Tensor& x, const at::Tensor& taps, const std::optional<at::Tensor>& bias, bool gelu,
                       bool residual) {
  check_dwconv_inputs(x, taps, bias);
  const c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  const int64_t C = x.size(1);
  const at::Tensor weight = taps.permute({2, 0, 1}).unsqueeze(1).to(x.scalar_type());  // (C, 1, 3, 3)
  std::optional<at::Tensor> b;
  if (bias.has_value()) b = bias->to(x.scalar_type());
  at::Tensor y = at::conv2d(x, weight, b, /*stride=*/{1, 1}, /*padding=*/{1, 1}, /*dilation=*/{1, 1}, C);
  if (gelu) y = at::gelu(y);
  if (residual) y = at::add(x, y);
  return y.contiguous(at::MemoryFormat::ChannelsLast);
}

TORCH_LIBRARY_FRAGMENT(rfsr, m) {
  m.def("depthwise_conv3x3(Tensor x, Tensor taps, Tensor? bias, bool gelu=False, bool residual=False) -> Tensor");
}

TORCH_LIBRARY_IMPL(rfsr, CPU, m) { m.impl("depthwise_conv3x3", &dwconv_aten); }

}  // namespace rfsr
