// rfsr::window_merge: argument checks and the ATen implementation, shared by the CPU registration
// (window_merge_op.cpp) and the CUDA binding (window_merge_cuda.cpp).
#pragma once

#include <ATen/ATen.h>

#include <optional>

namespace rfsr {

// The image a window_merge call writes: B images of H x W pixels, C channels from the windows, the window grid
// (nh, nw) of the padded map.
struct WindowMergeShape {
  int64_t B, H, W, C, wh, ww, nh, nw, sh, sw;
};

// Checks windows (B * nh * nw, wh * ww, C), the image size, window and shift, the optional gate (B, H, W, G >= C)
// and the output width; ValueError / TypeError naming the argument.
WindowMergeShape check_window_merge_inputs(const at::Tensor& windows, int64_t height, int64_t width,
                                           at::IntArrayRef window, at::IntArrayRef shift,
                                           const std::optional<at::Tensor>& gate, int64_t out_width);

at::Tensor window_merge_aten(const at::Tensor& windows, int64_t height, int64_t width, at::IntArrayRef window,
                             at::IntArrayRef shift, const std::optional<at::Tensor>& gate, int64_t out_width);

}  // namespace rfsr
