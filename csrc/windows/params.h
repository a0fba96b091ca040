// rfsr::window_partition and rfsr::window_merge on CUDA: the parameters of one call (no torch types;
// csrc/window_ops_cuda.cpp fills them).
//
// window_partition cuts pixel rows (B, H, W) into windows for attention: the map is reflect-padded at the bottom and
// right to whole windows (Hp = nh * wh, Wp = nw * ww; padded row j >= H is row 2 (H - 1) - j), rolled by -shift
// (position i holds padded pixel (i + shift) mod Hp), and window (wy, wx), token ty * ww + tx takes position
// (wy * wh + ty, wx * ww + tx). The first C channels of each pixel row are copied.
//
// window_merge is its inverse for the attention output. Window attention writes its output per window: rows (b * n_windows + window, token) of C channels. This merges
// them back into pixel rows (B, H, W) of `width` channels: pixel (y, x) sat at position ((y - shift_h) mod Hp,
// (x - shift_w) mod Wp) of the padded (Hp = nh * wh, Wp = nw * ww), cyclically shifted map, i.e. in window
// (py / wh, px / ww) at token (py % wh) * ww + px % ww. Optionally times sigmoid(gate) (gate: (B, H, W) rows, its
// first C channels), and columns [C, width) of each output row are zero.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "../common/dtype.h"

namespace rfsr {

// The lanes the kernels give one row of `vectors` accesses: as many as the vectors up to a warp, so every lane of a
// row moves the same number of vectors (the fewest passes of at most 32 lanes: SST's 135 vectors take 5 passes of
// 27 lanes, SST-light's 18 one pass of 18).
inline int lanes_for(int vectors) {
  const int passes = (vectors + 31) / 32;
  return (vectors + passes - 1) / passes;
}

struct WindowMergeParams {
  const void* windows = nullptr;  // rows of C channels: window row w * N + token at w * win_stride + token * tok_stride
  int64_t win_stride = 0, tok_stride = 0;
  const void* gate = nullptr;  // (B, H, W) pixel rows (first C channels read), or null
  int64_t gate_pixel_stride = 0;
  void* out = nullptr;  // (B, H, W, width), contiguous
  int B = 0, H = 0, W = 0, C = 0, width = 0;
  int wh = 1, ww = 1, nh = 1, nw = 1;  // window and window grid
  int shift_h = 0, shift_w = 0;        // in [0, Hp), [0, Wp)
  ElemDtype dtype = ElemDtype::kFloat32;
  int vec = 1;  // channels per access (divides C, width and every stride; the binding picks it)
};

cudaError_t window_merge(const WindowMergeParams& p, cudaStream_t stream);

struct WindowPartitionParams {
  const void* x = nullptr;  // (B, H, W) pixel rows, pixel p at p * pixel_stride (first C channels read)
  int64_t pixel_stride = 0;
  void* out = nullptr;  // (B * nh * nw, wh * ww, C), contiguous
  int B = 0, H = 0, W = 0, C = 0;
  int wh = 1, ww = 1, nh = 1, nw = 1;
  int shift_h = 0, shift_w = 0;  // in [0, Hp), [0, Wp)
  ElemDtype dtype = ElemDtype::kFloat32;
  int vec = 1;  // channels per access (divides C and pixel_stride)
};

cudaError_t window_partition(const WindowPartitionParams& p, cudaStream_t stream);

}  // namespace rfsr
