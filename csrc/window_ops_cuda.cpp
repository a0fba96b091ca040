// CUDA bindings of rfsr::window_partition and rfsr::window_merge: checks, layout, the access width, and the launches
// of csrc/windows (which sees no ATen). float64 and images too large for the kernels' 32-bit indices go to the ATen
// implementations.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <climits>

#include "common/aten_dtype.h"
#include "common/vec_width.h"
#include "windows/params.h"
#include "rfbias_checks.h"
#include "rfbias_cuda_common.h"  // is_aligned
#include "window_ops.h"

namespace rfsr {
namespace {

at::Tensor window_partition_cuda(const at::Tensor& x_in, at::IntArrayRef window, at::IntArrayRef shift,
                                 int64_t channels) {
  const WindowShape s = check_window_partition_inputs(x_in, window, shift, channels);
  const int64_t per_image = s.nh * s.wh * s.nw * s.ww * s.C;
  if (!is_elem_dtype(x_in.scalar_type()) || s.B > INT_MAX || per_image >= INT_MAX / 2 || s.H * s.W >= INT_MAX / 2) {
    return window_partition_aten(x_in, window, shift, channels);
  }
  c10::cuda::CUDAGuard guard(x_in.device());
  // pixel rows: (B, H, W) must collapse to one stride (a copy otherwise)
  const int64_t ps = x_in.stride(2);
  const bool rows = x_in.stride(3) == 1 && x_in.stride(1) == ps * x_in.size(2) &&
                    x_in.stride(0) == ps * x_in.size(2) * x_in.size(1);
  const at::Tensor x = rows ? x_in : x_in.narrow(3, 0, s.C).contiguous();
  at::Tensor out = at::empty({s.B * s.nh * s.nw, s.wh * s.ww, s.C}, x.options().memory_format(at::MemoryFormat::Contiguous));

  WindowPartitionParams p;
  p.x = x.data_ptr();
  p.pixel_stride = x.stride(2);
  p.out = out.data_ptr();
  p.B = static_cast<int>(s.B), p.H = static_cast<int>(s.H), p.W = static_cast<int>(s.W), p.C = static_cast<int>(s.C);
  p.wh = static_cast<int>(s.wh), p.ww = static_cast<int>(s.ww), p.nh = static_cast<int>(s.nh);
  p.nw = static_cast<int>(s.nw), p.shift_h = static_cast<int>(s.sh), p.shift_w = static_cast<int>(s.sw);
  p.dtype = elem_dtype(x.scalar_type(), "rfsr::window_partition");
  const int64_t es = x.element_size();
  p.vec = widest_vec(es, 16, [&](int vec) { return s.C % vec == 0 && is_aligned(x, vec * es); });
  const cudaError_t err = window_partition(p, at::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "rfsr::window_partition: kernel launch failed: ", cudaGetErrorString(err));
  return out;
}

at::Tensor window_merge_cuda(const at::Tensor& windows_in, int64_t height, int64_t width, at::IntArrayRef window,
                             at::IntArrayRef shift, const std::optional<at::Tensor>& gate_in, int64_t out_width) {
  const WindowShape s = check_window_merge_inputs(windows_in, height, width, window, shift, gate_in, out_width);
  const bool small = s.B <= INT_MAX && s.nh * s.wh <= INT_MAX / 2 && s.nw * s.ww <= INT_MAX / 2 &&
                     s.H * s.W * out_width < INT_MAX / 2;
  if (!is_elem_dtype(windows_in.scalar_type()) || !small) {
    return window_merge_aten(windows_in, height, width, window, shift, gate_in, out_width);
  }
  c10::cuda::CUDAGuard guard(windows_in.device());
  // rows of C contiguous channels; (window, token) may be strided
  const at::Tensor windows = windows_in.stride(2) == 1 ? windows_in : windows_in.contiguous();
  at::Tensor gate;
  if (gate_in.has_value()) {
    // pixel rows of G channels: (B, H, W) must collapse to one stride
    const at::Tensor& g = *gate_in;
    const int64_t ps = g.stride(2);
    const bool rows = g.stride(3) == 1 && g.stride(1) == ps * g.size(2) && g.stride(0) == ps * g.size(2) * g.size(1);
    gate = rows ? g : g.contiguous();
  }
  at::Tensor out = at::empty({s.B, s.H, s.W, out_width}, windows.options().memory_format(at::MemoryFormat::Contiguous));

  WindowMergeParams p;
  p.windows = windows.data_ptr();
  p.win_stride = windows.stride(0);
  p.tok_stride = windows.stride(1);
  p.gate = gate.defined() ? gate.data_ptr() : nullptr;
  p.gate_pixel_stride = gate.defined() ? gate.stride(2) : 0;
  p.out = out.data_ptr();
  p.B = static_cast<int>(s.B), p.H = static_cast<int>(s.H), p.W = static_cast<int>(s.W);
  p.C = static_cast<int>(s.C), p.width = static_cast<int>(out_width);
  p.wh = static_cast<int>(s.wh), p.ww = static_cast<int>(s.ww), p.nh = static_cast<int>(s.nh);
  p.nw = static_cast<int>(s.nw), p.shift_h = static_cast<int>(s.sh), p.shift_w = static_cast<int>(s.sw);
  p.dtype = elem_dtype(windows.scalar_type(), "rfsr::window_merge");
  const int64_t es = windows.element_size();
  p.vec = widest_vec(es, 16, [&](int vec) {
    return s.C % vec == 0 && out_width % vec == 0 && is_aligned(windows, vec * es) &&
           (!gate.defined() || is_aligned(gate, vec * es));
  });
  const cudaError_t err = window_merge(p, at::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "rfsr::window_merge: kernel launch failed: ", cudaGetErrorString(err));
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(rfsr, CUDA, m) {
  m.impl("window_partition", &window_partition_cuda);
  m.impl("window_merge", &window_merge_cuda);
}

}  // namespace rfsr
