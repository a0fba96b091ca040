// rfsr::window_partition / rfsr::window_merge: argument checks and the ATen implementations, shared by the CPU
// registration (window_ops.cpp) and the CUDA binding (window_ops_cuda.cpp).
#pragma once

#include <ATen/ATen.h>

#include <optional>

namespace rfsr {

// The image of a window_partition or window_merge call: B images of H x W pixels, C channels, the window grid
// (nh, nw) of the padded map.
struct WindowShape {
  int64_t B, H, W, C, wh, ww, nh, nw, sh, sw;
};

// Checks windows (B * nh * nw, wh * ww, C), the image size, window and shift, the optional gate (B, H, W, G >= C)
// and the output width; ValueError / TypeError naming the argument.
WindowShape check_window_merge_inputs(const at::Tensor& windows, int64_t height, int64_t width,
                                           at::IntArrayRef window, at::IntArrayRef shift,
                                           const std::optional<at::Tensor>& gate, int64_t out_width);

// Checks x (B, H, W, G) pixel rows, window, shift (reflect padding needs fewer padded rows than rows) and C <= G.
WindowShape check_window_partition_inputs(const at::Tensor& x, at::IntArrayRef window, at::IntArrayRef shift,
                                               int64_t channels);

at::Tensor window_partition_aten(const at::Tensor& x, at::IntArrayRef window, at::IntArrayRef shift, int64_t channels);

at::Tensor window_merge_aten(const at::Tensor& windows, int64_t height, int64_t width, at::IntArrayRef window,
                             at::IntArrayRef shift, const std::optional<at::Tensor>& gate, int64_t out_width);

}  // namespace rfsr
