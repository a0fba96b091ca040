"""Input checks of ``flash_rfbias`` for the fake (meta) kernels; they mirror csrc/rfbias_checks.h, which the CPU and
CUDA kernels run, and the tests hold both to the same error types and messages."""
from __future__ import annotations

import math

import torch


def require_tensors(named, allow_none: bool = True) -> None:
    """TypeError naming the first (name, value) pair whose value is not a tensor (None passes when allowed)."""
    for name, t in named:
        if not (isinstance(t, torch.Tensor) or (allow_none and t is None)):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")


def require_float(name: str, t: torch.Tensor, ndim: int | None = None, layout: str = "") -> None:
    """TypeError unless ``t`` is floating-point; with ``ndim``, ValueError unless it has that many dims (``layout``
    describes them in the message)."""
    if not t.dtype.is_floating_point:
        raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D {layout}, got shape {list(t.shape)}")


def _last_dim_unit_stride(t: torch.Tensor, name: str) -> None:
    if t.shape[-1] > 1 and t.stride(-1) != 1:
        raise ValueError(f"{name} must have unit stride in its last dimension (got strides {list(t.stride())}); "
                         "other dimensions may be strided")


def _same_device_dtype(q: torch.Tensor, t: torch.Tensor, name: str) -> None:
    if t.device != q.device:
        raise ValueError(f"{name} is on {t.device} but q is on {q.device}; all inputs must be on one device")
    if t.dtype != q.dtype:
        raise TypeError(f"{name} has dtype {t.dtype} but q has {q.dtype}; all inputs must share one dtype "
                        "(cast the factors to q's dtype)")


def check_fwd_inputs(q, k, v, bias_q, bias_k, *, unit_stride: bool = True):
    """Returns (B, N, H, D, R, bias_batched) or raises ValueError/TypeError naming the argument. ``unit_stride``
    False: any strides (the backward, which copies where the last dim is not unit-stride)."""
    require_tensors((("q", q), ("k", k), ("v", v), ("bias_q", bias_q), ("bias_k", bias_k)), allow_none=False)
    require_float("q", q, 4, "(B, N, H, D)")
    B, N, H, D = q.shape
    if D <= 0:
        raise ValueError(f"q must have a head dim D > 0, got shape {list(q.shape)}")
    for name, t in (("k", k), ("v", v)):
        if t.shape != q.shape:
            raise ValueError(f"{name} must have the shape of q (B, N, H, D) = {list(q.shape)}, got {list(t.shape)}")
    expect = f"(H, N, R) = ({H}, {N}, R) or (B, H, N, R) = ({B}, {H}, {N}, R)"
    if bias_q.dim() not in (3, 4):
        raise ValueError(f"bias_q must be {expect}, got shape {list(bias_q.shape)}")
    batched = bias_q.dim() == 4
    ok = tuple(bias_q.shape[:3]) == (B, H, N) if batched else tuple(bias_q.shape[:2]) == (H, N)
    if not ok:
        raise ValueError(f"bias_q must be {expect} for q of shape {list(q.shape)}, got {list(bias_q.shape)}")
    if bias_k.shape != bias_q.shape:
        raise ValueError(f"bias_k must have the shape of bias_q {list(bias_q.shape)}, got {list(bias_k.shape)}")
    for name, t in (("k", k), ("v", v), ("bias_q", bias_q), ("bias_k", bias_k)):
        _same_device_dtype(q, t, name)
    if unit_stride:
        for name, t in (("q", q), ("k", k), ("v", v), ("bias_q", bias_q), ("bias_k", bias_k)):
            _last_dim_unit_stride(t, name)
    return B, N, H, D, bias_q.shape[-1], batched


def check_scale(scale) -> None:
    if not isinstance(scale, (int, float)) or isinstance(scale, bool):
        raise TypeError(f"scale must be a float or None, got {type(scale).__name__}")
    if not math.isfinite(scale):
        raise ValueError(f"scale must be a finite number, got {scale}")


def lse_dtype_for(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_bwd_inputs(grad_out, q, out, lse) -> None:
    """The backward's own inputs; any strides (csrc/rfbias_checks.h ``bwd_any_strides``)."""
    B, N, H, _ = q.shape
    for name, t in (("grad_out", grad_out), ("out", out)):
        if t.shape != q.shape:
            raise ValueError(f"{name} must have the shape of q {list(q.shape)}, got {list(t.shape)}")
        _same_device_dtype(q, t, name)
    if lse.dim() != 3 or tuple(lse.shape) != (B, H, N):
        raise ValueError(f"lse must be (B, H, N) = ({B}, {H}, {N}), got shape {list(lse.shape)}")
    if lse.device != q.device:
        raise ValueError(f"lse is on {lse.device} but q is on {q.device}")
    if lse.dtype != lse_dtype_for(q.dtype):
        raise TypeError(f"lse must have dtype {lse_dtype_for(q.dtype)} for {q.dtype} inputs, got {lse.dtype}")
