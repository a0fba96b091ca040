// rfbias_scale_factor (scale_factor.h): one thread per element, the rounding of dev::Pack2::scale1.
#include "scale_factor.h"

#include <algorithm>

#include "common/utils.h"

namespace rfsr {
namespace {

template <typename Element>
__global__ void scale_factor_kernel(const RfbiasScaleFactorParams p) {
  const int64_t total = p.windows * p.H * int64_t(p.N) * p.R;
  const Element* src = static_cast<const Element*>(p.src);
  uint16_t* dst = static_cast<uint16_t*>(p.dst);
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    const int r = int(i % p.R);
    const int64_t row = i / p.R;
    const int n = int(row % p.N);
    const int64_t bh = row / p.N;
    const int h = int(bh % p.H);
    const int64_t b = bh / p.H;
    const uint16_t w = *reinterpret_cast<const uint16_t*>(src + b * p.batch_stride + h * p.head_stride +
                                                          int64_t(n) * p.row_stride + r);
    dst[i] = p.mult == 1.0f ? w : dev::Pack2<Element>::scale1(w, p.mult);
  }
}

}  // namespace

cudaError_t rfbias_scale_factor(const RfbiasScaleFactorParams& p, cudaStream_t stream) {
  const int64_t total = p.windows * p.H * int64_t(p.N) * p.R;
  if (total <= 0) return cudaSuccess;
  const unsigned grid = unsigned(std::min<int64_t>((total + 255) / 256, 65535));  // grid-stride beyond
  if (p.dtype == RfbiasDtype::kFloat16) {
    scale_factor_kernel<cutlass::half_t><<<grid, 256, 0, stream>>>(p);
  } else {
    scale_factor_kernel<cutlass::bfloat16_t><<<grid, 256, 0, stream>>>(p);
  }
  return cudaGetLastError();
}

}  // namespace rfsr
