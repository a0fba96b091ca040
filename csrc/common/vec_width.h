// Host side: the access width of the elementwise kernels (window partition/merge, depthwise conv, LayerNorm).
#pragma once

#include <cstdint>

namespace rfsr {

// The widest access in elements (a power of two, at most max_bytes wide) that `fits`: the caller's test that it
// divides every channel count and row length and the alignment of every pointer and stride. One element always fits.
template <class Fits>
inline int widest_vec(int64_t elem_size, int max_bytes, Fits&& fits) {
  for (int vec = max_bytes / static_cast<int>(elem_size); vec > 1; vec /= 2) {
    if (fits(vec)) return vec;
  }
  return 1;
}

}  // namespace rfsr
