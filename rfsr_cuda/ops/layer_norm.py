"""``torch.ops.rfsr.layer_norm`` / ``add_layer_norm``: LayerNorm over the last dim into rows padded with zeros.

The schemas and the CPU and CUDA kernels live in csrc (layer_norm_op.cpp, layer_norm_cuda.cpp, layernorm/); this
module adds the fake kernels (torch.compile, meta tensors) and a Python entry point. Inference only: no autograd
formula (the model's training path uses ``F.layer_norm``).
"""
from __future__ import annotations

import math

import torch

from . import flash_rfbias as _library  # noqa: F401  (loads rfsr_cuda._C, which registers the schemas)
from ._checks import require_float, require_tensors


def _check(x, residual, weight, bias, eps, width, norm_cols=None) -> int:
    """Mirrors check_layer_norm_inputs (csrc/layer_norm_op.cpp); returns C."""
    require_float("x", x)
    if x.dim() < 1 or x.shape[-1] < 1:
        raise ValueError(f"x must have a non-empty last dim (the normalised one), got shape {list(x.shape)}")
    C = x.shape[-1]
    if residual is not None:
        if residual.shape != x.shape:
            raise ValueError(f"residual must have the shape of x {list(x.shape)}, got {list(residual.shape)}")
        if residual.device != x.device:
            raise ValueError(f"residual is on {residual.device} but x is on {x.device}")
        if residual.dtype != x.dtype:
            raise TypeError(f"residual has dtype {residual.dtype} but x has {x.dtype}; they must match")
    for name, t in (("weight", weight), ("bias", bias)):
        if t.dim() != 1 or t.shape[0] != C:
            raise ValueError(f"{name} must have shape [{C}] (x's last dim), got {list(t.shape)}")
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}")
        if not t.dtype.is_floating_point:
            raise TypeError(f"{name} must be floating-point, got {t.dtype}")
    if not (math.isfinite(eps) and eps >= 0):
        raise ValueError(f"eps must be a finite number >= 0, got {eps}")
    if width < C:
        raise ValueError(f"width must be >= x's last dim {C} (extra columns are zero), got {width}")
    if norm_cols is not None and not 1 <= norm_cols <= C:
        raise ValueError(f"norm_cols must be between 1 and x's last dim {C}, got {norm_cols}")
    return C


@torch.library.register_fake("rfsr::layer_norm")
def _layer_norm_fake(x, weight, bias, eps, width, norm_cols=None):
    _check(x, None, weight, bias, eps, width, norm_cols)
    return x.new_empty((*x.shape[:-1], width))


@torch.library.register_fake("rfsr::add_layer_norm")
def _add_layer_norm_fake(x, residual, weight, bias, eps, width, norm_cols=None):
    _check(x, residual, weight, bias, eps, width, norm_cols)
    return x.new_empty((*x.shape[:-1], width)), x.new_empty(x.shape)


def layer_norm_padded(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float = 1e-5,
                      width: int | None = None, residual: torch.Tensor | None = None, norm_cols: int | None = None):
    """LayerNorm over the last dim of ``x`` (of ``x + residual`` when given), in float32 statistics.

    Returns ``(..., width)`` rows in x's dtype, contiguous, whose columns past ``C = x.shape[-1]`` are zero (``width``
    defaults to C); with a residual, returns ``(normalised, x + residual)``, the sum rounded to x's dtype first, as
    the unfused ``s = x + residual; layer_norm(s)``. ``x`` and ``residual`` may be views of wider rows (the first C
    columns of a padded buffer). ``weight`` and ``bias`` are ``(C,)``, float32 or x's dtype. No autograd.

    ``norm_cols`` (1 to C; C by default) takes the mean and variance from the first ``norm_cols`` columns only, and
    normalises every column with them: a row of real channels followed by zero channels with zero weights and biases
    (a channel-padded activation) stays zero-padded and is read with the widest accesses.
    """
    require_tensors((("x", x), ("weight", weight), ("bias", bias), ("residual", residual)))
    width = x.shape[-1] if width is None else width
    if isinstance(width, bool) or not isinstance(width, int):
        raise TypeError(f"width must be an int, got {width!r}")
    if norm_cols is not None and (isinstance(norm_cols, bool) or not isinstance(norm_cols, int)):
        raise TypeError(f"norm_cols must be an int or None, got {norm_cols!r}")
    if residual is None:
        return torch.ops.rfsr.layer_norm(x, weight, bias, float(eps), width, norm_cols)
    return torch.ops.rfsr.add_layer_norm(x, residual, weight, bias, float(eps), width, norm_cols)
