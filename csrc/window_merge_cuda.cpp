// CUDA binding of rfsr::window_merge: checks, layout, the access width, and the launch of csrc/merge (which sees no
// ATen). float64 and images too large for the kernel's 32-bit indices go to the ATen implementation.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <climits>

#include "merge/params.h"
#include "rfbias_checks.h"
#include "rfbias_cuda_common.h"  // is_aligned
#include "window_merge_op.h"

namespace rfsr {
namespace {

at::Tensor window_merge_cuda(const at::Tensor& windows_in, int64_t height, int64_t width, at::IntArrayRef window,
                             at::IntArrayRef shift, const std::optional<at::Tensor>& gate_in, int64_t out_width) {
  const WindowMergeShape s = check_window_merge_inputs(windows_in, height, width, window, shift, gate_in, out_width);
  const auto st = windows_in.scalar_type();
  const bool small = s.B <= INT_MAX && s.nh * s.wh <= INT_MAX / 2 && s.nw * s.ww <= INT_MAX / 2 &&
                     s.H * s.W * out_width < INT_MAX / 2;
  if ((st != at::kFloat && st != at::kHalf && st != at::kBFloat16) || !small) {
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
  p.dtype = st == at::kFloat ? MergeDtype::kFloat32 : st == at::kHalf ? MergeDtype::kFloat16 : MergeDtype::kBFloat16;
  // the widest access (up to 16 bytes) that divides the channel counts, the strides and the pointers
  const int64_t es = windows.element_size();
  for (int vec = 16 / static_cast<int>(es); vec >= 1; vec /= 2) {
    if (s.C % vec == 0 && out_width % vec == 0 && is_aligned(windows, vec * es) &&
        (!gate.defined() || is_aligned(gate, vec * es))) {
      p.vec = vec;
      break;
    }
  }
  const cudaError_t err = window_merge(p, at::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "rfsr::window_merge: kernel launch failed: ", cudaGetErrorString(err));
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(rfsr, CUDA, m) { m.impl("window_merge", &window_merge_cuda); }

}  // namespace rfsr
