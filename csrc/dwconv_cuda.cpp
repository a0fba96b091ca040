// CUDA binding of rfsr::depthwise_conv3x3: checks, layout, the access width, and the launch of csrc/dwconv (which
// sees no ATen). float64 goes to the ATen implementation.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <climits>

#include "common/aten_dtype.h"
#include "common/vec_width.h"
#include "dwconv/params.h"
#include "dwconv_op.h"
#include "rfbias_checks.h"

namespace rfsr {
namespace {

at::Tensor dwconv_cuda(const at::Tensor& x_in, const at::Tensor& taps_in, const std::optional<at::Tensor>& bias_in,
                       bool gelu, bool residual) {
  check_dwconv_inputs(x_in, taps_in, bias_in);
  const auto st = x_in.scalar_type();
  if (!is_elem_dtype(st)) return dwconv_aten(x_in, taps_in, bias_in, gelu, residual);
  TORCH_CHECK_VALUE(x_in.size(2) <= INT_MAX && x_in.size(3) <= INT_MAX && x_in.size(1) <= INT_MAX,
                    "x: sizes too large for the CUDA kernel, got shape ", shape_str(x_in));
  c10::cuda::CUDAGuard guard(x_in.device());
  // channels-last pixels: (B, H, W, C) rows of C contiguous channels (a copy only for other layouts)
  const at::Tensor x = x_in.contiguous(at::MemoryFormat::ChannelsLast);
  const at::Tensor taps = taps_in.to(at::kFloat).contiguous();
  at::Tensor bias;
  if (bias_in.has_value()) bias = bias_in->to(at::kFloat).contiguous();
  at::Tensor out = at::empty_like(x, at::MemoryFormat::ChannelsLast);

  DwConvParams p;
  p.x = x.data_ptr();
  p.taps = taps.data_ptr<float>();
  p.bias = bias.defined() ? bias.data_ptr<float>() : nullptr;
  p.out = out.data_ptr();
  p.B = x.size(0);
  p.C = static_cast<int>(x.size(1));
  p.H = static_cast<int>(x.size(2));
  p.W = static_cast<int>(x.size(3));
  p.gelu = gelu;
  p.residual = residual;
  p.dtype = elem_dtype(st, "rfsr::depthwise_conv3x3");
  const int64_t es = x.element_size();
  p.vec = widest_vec(es, 8, [&](int vec) {  // 8-byte accesses at most (the kernel's tile)
    return p.C % vec == 0 && reinterpret_cast<uintptr_t>(x.data_ptr()) % (vec * es) == 0;
  });
  const cudaError_t err = depthwise_conv3x3(p, at::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "rfsr::depthwise_conv3x3: kernel launch failed: ", cudaGetErrorString(err));
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(rfsr, CUDA, m) { m.impl("depthwise_conv3x3", &dwconv_cuda); }

}  // namespace rfsr
