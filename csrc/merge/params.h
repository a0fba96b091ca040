// rfsr::window_merge on CUDA: the parameters of one call (no torch types; csrc/window_merge_cuda.cpp fills them).
//
// Window attention writes its output per window: rows (b * n_windows + window, token) of C channels. This merges
// them back into pixel rows (B, H, W) of `width` channels: pixel (y, x) sat at position ((y - shift_h) mod Hp,
// (x - shift_w) mod Wp) of the padded (Hp = nh * wh, Wp = nw * ww), cyclically shifted map, i.e. in window
// (py / wh, px / ww) at token (py % wh) * ww + px % ww. Optionally times sigmoid(gate) (gate: (B, H, W) rows, its
// first C channels), and columns [C, width) of each output row are zero.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace rfsr {

enum class MergeDtype : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

struct WindowMergeParams {
  const void* windows = nullptr;  // rows of C channels: window row w * N + token at w * win_stride + token * tok_stride
  int64_t win_stride = 0, tok_stride = 0;
  const void* gate = nullptr;  // (B, H, W) pixel rows (first C channels read), or null
  int64_t gate_pixel_stride = 0;
  void* out = nullptr;  // (B, H, W, width), contiguous
  int B = 0, H = 0, W = 0, C = 0, width = 0;
  int wh = 1, ww = 1, nh = 1, nw = 1;  // window and window grid
  int shift_h = 0, shift_w = 0;        // in [0, Hp), [0, Wp)
  MergeDtype dtype = MergeDtype::kFloat32;
  int vec = 1;  // channels per access (divides C, width and every stride; the binding picks it)
};

cudaError_t window_merge(const WindowMergeParams& p, cudaStream_t stream);

}  // namespace rfsr
