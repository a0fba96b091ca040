// The chunked ATen implementation of rfsr::flash_rfbias (any device, any floating dtype; float32 accumulation,
// float64 for float64 inputs). The CPU kernels, and the CUDA fallback for cases the fused kernels do not take.
#pragma once

#include <ATen/ATen.h>

#include <tuple>

namespace rfsr {

std::tuple<at::Tensor, at::Tensor> flash_rfbias_fwd_aten(const at::Tensor& q, const at::Tensor& k,
                                                         const at::Tensor& v, const at::Tensor& bias_q,
                                                         const at::Tensor& bias_k, double scale);

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> flash_rfbias_bwd_aten(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& bias_q, const at::Tensor& bias_k, const at::Tensor& out, const at::Tensor& lse,
    double scale);

}  // namespace rfsr
