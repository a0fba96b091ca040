// rfsr::depthwise_conv3x3: argument checks and the ATen implementation, shared by the CPU registration
// (dwconv_op.cpp) and the CUDA binding (dwconv_cuda.cpp).
#pragma once

#include <ATen/ATen.h>

#include <optional>

namespace rfsr {

// Checks x (B, C, H, W), taps (3, 3, C) and bias (C,) or none; ValueError / TypeError naming the argument.
void check_dwconv_inputs(const at::Tensor& x, const at::Tensor& taps, const std::optional<at::Tensor>& bias);

at::Tensor dwconv_aten(const at::Tensor& x, const at::Tensor& taps, const std::optional<at::Tensor>& bias, bool gelu,
                       bool residual);

}  // namespace rfsr
