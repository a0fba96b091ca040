// rfsr::window_partition and rfsr::window_merge: the schemas, the input checks and the ATen implementations (the CPU
// kernels). Window attention's data movement around the attention op (see rfsr_cuda.nn.attention.RIBWindowAttention):
// partition: the first C channels of pixel rows, reflect-padded at the bottom/right to whole windows, rolled by
//   -shift, cut into windows (B * nh * nw, wh * ww, C);
// merge: the attention output back into pixel rows (merge the windows, undo the shift, crop the padding), optionally
//   times sigmoid(gate), into rows of `out_width` >= C channels whose extra columns are zero (the padded layout the
//   1x1 GEMM after it reads).
#include <torch/library.h>

#include <c10/core/impl/LocalDispatchKeySet.h>

#include "rfbias_checks.h"  // num, shape_str, dtype_str, dev_str
#include "window_ops.h"

namespace rfsr {

namespace {

// window, shift and the window grid of an H x W image
WindowShape check_geometry(int64_t height, int64_t width, at::IntArrayRef window, at::IntArrayRef shift) {
  TORCH_CHECK_VALUE(height >= 1 && width >= 1, "height and width must be >= 1, got ", num(height), " and ", num(width));
  TORCH_CHECK_VALUE(window.size() == 2 && window[0] >= 1 && window[1] >= 1,
                    "window must be two sizes >= 1 (wh, ww), got ", list_str(window));
  TORCH_CHECK_VALUE(shift.size() == 2, "shift must be two offsets (sh, sw), got ", list_str(shift));
  WindowShape s{};
  s.H = height, s.W = width, s.wh = window[0], s.ww = window[1];
  s.nh = (height + s.wh - 1) / s.wh, s.nw = (width + s.ww - 1) / s.ww;
  s.sh = shift[0], s.sw = shift[1];
  TORCH_CHECK_VALUE(s.sh >= 0 && s.sh < s.nh * s.wh && s.sw >= 0 && s.sw < s.nw * s.ww,
                    "shift must lie in [0, padded size) = [0, ", num(s.nh * s.wh), ") x [0, ", num(s.nw * s.ww),
                    "), got ", list_str(shift));
  return s;
}

}  // namespace

WindowShape check_window_partition_inputs(const at::Tensor& x, at::IntArrayRef window, at::IntArrayRef shift,
                                          int64_t channels) {
  TORCH_CHECK_TYPE(at::isFloatingType(x.scalar_type()), "x must be a floating-point tensor, got ", dtype_str(x));
  TORCH_CHECK_VALUE(x.dim() == 4, "x must be 4-D (B, H, W, G) pixel rows, got shape ", shape_str(x));
  TORCH_CHECK_VALUE(x.size(1) >= 1 && x.size(2) >= 1, "x must have at least one pixel, got shape ", shape_str(x));
  WindowShape s = check_geometry(x.size(1), x.size(2), window, shift);
  TORCH_CHECK_VALUE(s.nh * s.wh - s.H < s.H && s.nw * s.ww - s.W < s.W,
                    "x is ", num(s.H), " x ", num(s.W), ", too small for window ", list_str(window),
                    ": reflect padding to whole windows needs each side > its padding (", num(s.nh * s.wh - s.H),
                    " x ", num(s.nw * s.ww - s.W), ")");
  TORCH_CHECK_VALUE(channels >= 1 && channels <= x.size(3), "channels must be in [1, ", num(x.size(3)),
                    "] (the first channels of each pixel row), got ", num(channels));
  s.B = x.size(0);
  s.C = channels;
  return s;
}

at::Tensor window_partition_aten(const at::Tensor& x, at::IntArrayRef window, at::IntArrayRef shift, int64_t channels) {
  const WindowShape s = check_window_partition_inputs(x, window, shift, channels);
  const auto opts = x.options().dtype(at::kLong);
  // the source pixel of every padded, shifted position: (i + shift) mod padded, reflected past the edge
  auto source = [&](int64_t n, int64_t padded, int64_t sh) {
    const at::Tensor j = at::remainder(at::arange(padded, opts) + sh, padded);
    return at::where(j < n, j, 2 * (n - 1) - j);
  };
  const at::Tensor rows = source(s.H, s.nh * s.wh, s.sh);
  const at::Tensor cols = source(s.W, s.nw * s.ww, s.sw);
  const at::Tensor idx = (rows.view({s.nh, 1, s.wh, 1}) * s.W + cols.view({1, s.nw, 1, s.ww})).flatten();
  return x.narrow(3, 0, s.C).reshape({s.B, s.H * s.W, s.C}).index_select(1, idx)
      .view({s.B * s.nh * s.nw, s.wh * s.ww, s.C});
}

WindowShape check_window_merge_inputs(const at::Tensor& windows, int64_t height, int64_t width,
                                      at::IntArrayRef window, at::IntArrayRef shift,
                                      const std::optional<at::Tensor>& gate, int64_t out_width) {
  TORCH_CHECK_TYPE(at::isFloatingType(windows.scalar_type()), "windows must be a floating-point tensor, got ",
                   dtype_str(windows));
  TORCH_CHECK_VALUE(windows.dim() == 3, "windows must be 3-D (B * windows per image, tokens per window, C), got shape ",
                    shape_str(windows));
  WindowShape s = check_geometry(height, width, window, shift);
  TORCH_CHECK_VALUE(windows.size(1) == s.wh * s.ww, "windows must have wh * ww = ", num(s.wh * s.ww),
                    " tokens per window (dim 1), got shape ", shape_str(windows));
  const int64_t per_image = s.nh * s.nw;
  TORCH_CHECK_VALUE(windows.size(0) % per_image == 0,
                    "windows must hold B * ", num(per_image), " windows (a ", num(s.nh), " x ", num(s.nw),
                    " grid per ", num(height), " x ", num(width), " image), got shape ", shape_str(windows));
  s.B = windows.size(0) / per_image;
  s.C = windows.size(2);
  TORCH_CHECK_VALUE(s.C >= 1, "windows must have at least one channel, got shape ", shape_str(windows));
  TORCH_CHECK_VALUE(out_width >= s.C, "out_width must be >= the ", num(s.C), " channels (extra columns are zero), got ",
                    num(out_width));
  if (gate.has_value()) {
    TORCH_CHECK_VALUE(gate->dim() == 4 && gate->size(0) == s.B && gate->size(1) == height &&
                          gate->size(2) == width && gate->size(3) >= s.C,
                      "gate must be (B, H, W, G) = (", num(s.B), ", ", num(height), ", ", num(width), ", >= ", num(s.C),
                      ") pixel rows, got shape ", shape_str(*gate));
    TORCH_CHECK_VALUE(gate->device() == windows.device(), "gate is on ", dev_str(*gate), " but windows is on ",
                      dev_str(windows));
    TORCH_CHECK_TYPE(gate->scalar_type() == windows.scalar_type(), "gate has dtype ", dtype_str(*gate),
                     " but windows has ", dtype_str(windows), "; they must match");
  }
  return s;
}

at::Tensor window_merge_aten(const at::Tensor& windows, int64_t height, int64_t width, at::IntArrayRef window,
                             at::IntArrayRef shift, const std::optional<at::Tensor>& gate, int64_t out_width) {
  const WindowShape s = check_window_merge_inputs(windows, height, width, window, shift, gate, out_width);
  const c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  const int64_t N = s.wh * s.ww;
  const auto opts = windows.options().dtype(at::kLong);
  // pixel y sits at row (y - sh) mod Hp of the shifted, padded map: window row part and token row part
  const at::Tensor py = at::remainder(at::arange(s.H, opts) - s.sh, s.nh * s.wh);
  const at::Tensor px = at::remainder(at::arange(s.W, opts) - s.sw, s.nw * s.ww);
  const at::Tensor rows = at::floor_divide(py, s.wh) * (s.nw * N) + at::remainder(py, s.wh) * s.ww;
  const at::Tensor cols = at::floor_divide(px, s.ww) * N + at::remainder(px, s.ww);
  const at::Tensor idx = (rows.unsqueeze(1) + cols.unsqueeze(0)).flatten();
  at::Tensor merged = windows.reshape({s.B, s.nh * s.nw * N, s.C}).index_select(1, idx).view({s.B, s.H, s.W, s.C});
  if (gate.has_value()) merged = at::mul(at::sigmoid(gate->narrow(-1, 0, s.C)), merged);  // rounded as unfused
  if (out_width == s.C) return merged.contiguous();
  at::Tensor out = at::zeros({s.B, s.H, s.W, out_width}, windows.options().memory_format(at::MemoryFormat::Contiguous));
  out.narrow(-1, 0, s.C).copy_(merged);
  return out;
}

TORCH_LIBRARY_FRAGMENT(rfsr, m) {
  m.def("window_partition(Tensor x, int[2] window, int[2] shift, int channels) -> Tensor");
  m.def("window_merge(Tensor windows, int height, int width, int[2] window, int[2] shift, Tensor? gate, "
        "int out_width) -> Tensor");
}

TORCH_LIBRARY_IMPL(rfsr, CPU, m) {
  m.impl("window_partition", &window_partition_aten);
  m.impl("window_merge", &window_merge_aten);
}

}  // namespace rfsr
