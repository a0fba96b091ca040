// CUDA binding of rfsr::layer_norm / rfsr::add_layer_norm: checks, output allocation, the access width, and the
// launch of csrc/layernorm (which sees no ATen). Rows wider than the kernel takes go to the ATen implementation.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <climits>

#include "common/aten_dtype.h"
#include "common/vec_width.h"
#include "layer_norm_op.h"
#include "layernorm/params.h"
#include "rfbias_checks.h"

namespace rfsr {
namespace {

// The stride between consecutive rows when the leading dims collapse into one (a contiguous tensor, or a view of
// the first columns of wider rows), else -1.
int64_t row_stride(const at::Tensor& t) {
  if (t.size(-1) > 1 && t.stride(-1) != 1) return -1;
  int64_t stride = -1, expect = -1;
  for (int64_t d = t.dim() - 2; d >= 0; --d) {
    if (t.size(d) == 1) continue;
    if (stride < 0) {
      stride = expect = t.stride(d);
    } else if (t.stride(d) != expect) {
      return -1;
    }
    expect *= t.size(d);
  }
  return stride < 0 ? t.size(-1) : stride;
}

bool aligned(const at::Tensor& t, int64_t stride, int64_t bytes) {
  return reinterpret_cast<uintptr_t>(t.data_ptr()) % bytes == 0 && (stride * t.element_size()) % bytes == 0;
}

std::tuple<at::Tensor, at::Tensor> layer_norm_cuda_impl(const at::Tensor& x_in, const std::optional<at::Tensor>& y_in,
                                                        const at::Tensor& weight_in, const at::Tensor& bias_in,
                                                        double eps, int64_t width, std::optional<int64_t> norm_cols) {
  const int64_t n_stat = check_layer_norm_inputs(x_in, y_in, weight_in, bias_in, eps, width, norm_cols);
  const int64_t C = x_in.size(-1);
  if (x_in.scalar_type() == at::kDouble) return layer_norm_aten(x_in, y_in, weight_in, bias_in, eps, width, norm_cols);
  const ElemDtype dt = elem_dtype(x_in.scalar_type(), "rfsr::layer_norm");
  const bool param_f32 = weight_in.scalar_type() == at::kFloat && bias_in.scalar_type() == at::kFloat;
  const bool param_same = weight_in.scalar_type() == x_in.scalar_type() && bias_in.scalar_type() == x_in.scalar_type();
  if ((!param_f32 && !param_same) || C > int64_t(kLayerNormMaxAccesses) * 8 || width > INT_MAX) {
    return layer_norm_aten(x_in, y_in, weight_in, bias_in, eps, width, norm_cols);  // mixed parameter dtypes, wide rows
  }
  c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = row_stride(x_in) < 0 ? x_in.contiguous() : x_in;
  std::optional<at::Tensor> y;
  if (y_in.has_value()) y = row_stride(*y_in) < 0 ? y_in->contiguous() : *y_in;
  const at::Tensor weight = weight_in.contiguous(), bias = bias_in.contiguous();

  auto sizes = x.sizes().vec();
  sizes.back() = width;
  at::Tensor out = at::empty(sizes, x.options().memory_format(at::MemoryFormat::Contiguous));
  at::Tensor sum;
  if (y.has_value()) sum = at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
  const int64_t rows = x.numel() / C;
  if (rows == 0) return {out, sum};

  LayerNormParams p;
  p.x = x.data_ptr();
  p.y = y.has_value() ? y->data_ptr() : nullptr;
  p.weight = weight.data_ptr();
  p.bias = bias.data_ptr();
  p.out = out.data_ptr();
  p.sum = y.has_value() ? sum.data_ptr() : nullptr;
  p.rows = rows;
  p.cols = static_cast<int>(C);
  p.norm_cols = static_cast<int>(n_stat);
  p.width = static_cast<int>(width);
  p.x_row_stride = row_stride(x);
  p.y_row_stride = y.has_value() ? row_stride(*y) : 0;
  p.eps = static_cast<float>(eps);
  p.dtype = dt;
  p.param_dtype = param_f32 ? ElemDtype::kFloat32 : dt;
  // The widest access (up to 16 bytes) that divides the row, the padded row and every pointer and row stride.
  p.vec = widest_vec(x.element_size(), 16, [&](int vec) {
    const int64_t bytes = vec * x.element_size(), pbytes = vec * weight.element_size();
    if (C % vec || width % vec || !aligned(x, p.x_row_stride, bytes)) return false;
    if (y.has_value() && !aligned(*y, p.y_row_stride, bytes)) return false;
    return reinterpret_cast<uintptr_t>(weight.data_ptr()) % pbytes == 0 &&
           reinterpret_cast<uintptr_t>(bias.data_ptr()) % pbytes == 0;
  });
  if (C / p.vec > kLayerNormMaxAccesses) return layer_norm_aten(x_in, y_in, weight_in, bias_in, eps, width, norm_cols);
  const cudaError_t err = layer_norm_rows(p, at::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "rfsr::layer_norm: kernel launch failed: ", cudaGetErrorString(err));
  return {out, sum};
}

}  // namespace

TORCH_LIBRARY_IMPL(rfsr, CUDA, m) {
  m.impl("layer_norm", &layer_norm_entry<&layer_norm_cuda_impl>);
  m.impl("add_layer_norm", &add_layer_norm_entry<&layer_norm_cuda_impl>);
}

}  // namespace rfsr
