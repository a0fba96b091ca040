// rfsr::layer_norm / rfsr::add_layer_norm: argument checks and the ATen implementation, shared by the CPU
// registration (layer_norm_op.cpp) and the CUDA binding (layer_norm_cuda.cpp), which falls back to it for rows
// wider than its kernel takes.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>

namespace rfsr {

// Checks x (..., C), the optional residual y (same shape), weight and bias (C,), eps, the output width and
// norm_cols (1 <= n <= C: the mean and variance are those of the first n columns; C when absent); returns n.
// Errors are ValueError / TypeError naming the argument.
int64_t check_layer_norm_inputs(const at::Tensor& x, const std::optional<at::Tensor>& y, const at::Tensor& weight,
                                const at::Tensor& bias, double eps, int64_t width, std::optional<int64_t> norm_cols);

// (normalised rows (..., width) with zero columns past C, the sum x + y (..., C) or an undefined tensor without y).
// Every column is normalised with the statistics of the first norm_cols columns and scaled by its weight and bias.
std::tuple<at::Tensor, at::Tensor> layer_norm_aten(const at::Tensor& x, const std::optional<at::Tensor>& y,
                                                   const at::Tensor& weight, const at::Tensor& bias, double eps,
                                                   int64_t width, std::optional<int64_t> norm_cols);

// The two schemas' entry points over one implementation `Impl` with the signature of layer_norm_aten.
template <auto Impl>
at::Tensor layer_norm_entry(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias, double eps,
                            int64_t width, std::optional<int64_t> norm_cols) {
  return std::get<0>(Impl(x, std::nullopt, weight, bias, eps, width, norm_cols));
}

template <auto Impl>
std::tuple<at::Tensor, at::Tensor> add_layer_norm_entry(const at::Tensor& x, const at::Tensor& y,
                                                        const at::Tensor& weight, const at::Tensor& bias, double eps,
                                                        int64_t width, std::optional<int64_t> norm_cols) {
  return Impl(x, y, weight, bias, eps, width, norm_cols);
}

}  // namespace rfsr
