"""``torch.ops.rfsr.depthwise_conv3x3``: SST's depthwise 3×3 convs with their bias, GELU and residual in one op.

``out = act(conv(x) + bias) [+ x]`` with zero padding 1, ``act`` the identity or the exact GELU, channels-last
output. The schema and the CPU (ATen) and CUDA kernels live in csrc (dwconv_op.cpp, dwconv_cuda.cpp, dwconv/); this
module adds the fake kernel and a Python entry point. Inference only: no autograd formula.
"""
from __future__ import annotations

import torch

from . import flash_rfbias as _library  # noqa: F401  (loads rfsr_cuda._C, which registers the schemas)
from ._checks import require_float, require_tensors


def _check(x, taps, bias) -> None:
    """Mirrors check_dwconv_inputs (csrc/dwconv_op.cpp)."""
    require_tensors((("x", x), ("taps", taps), ("bias", bias)))
    require_float("x", x, 4, "(B, C, H, W)")
    C = x.shape[1]
    if taps.shape != (3, 3, C):
        raise ValueError(f"taps must have shape [3, 3, {C}] (a conv weight (C, 1, 3, 3) permuted to (3, 3, C)), "
                         f"got {list(taps.shape)}")
    if taps.device != x.device:
        raise ValueError(f"taps is on {taps.device} but x is on {x.device}")
    if not taps.dtype.is_floating_point:
        raise TypeError(f"taps must be floating-point, got {taps.dtype}")
    if bias is not None:
        if bias.shape != (C,):
            raise ValueError(f"bias must have shape [{C}], got {list(bias.shape)}")
        if bias.device != x.device:
            raise ValueError(f"bias is on {bias.device} but x is on {x.device}")
        if not bias.dtype.is_floating_point:
            raise TypeError(f"bias must be floating-point, got {bias.dtype}")


@torch.library.register_fake("rfsr::depthwise_conv3x3")
def _fake(x, taps, bias, gelu=False, residual=False):
    _check(x, taps, bias)
    return torch.empty_like(x, memory_format=torch.channels_last)


def op_param(t: torch.Tensor) -> torch.Tensor:
    """A weight or bias as the op takes it: float32 (float64 stays float64, for float64 models)."""
    return t.detach().to(torch.float64 if t.dtype == torch.float64 else torch.float32)


def depthwise_taps(weight: torch.Tensor) -> torch.Tensor:
    """A depthwise conv weight ``(C, 1, 3, 3)`` as the op's taps ``(3, 3, C)`` (``op_param`` dtype)."""
    if weight.dim() != 4 or weight.shape[1:] != (1, 3, 3):
        raise ValueError(f"weight must be a depthwise 3×3 conv weight (C, 1, 3, 3), got {list(weight.shape)}")
    return op_param(weight)[:, 0].permute(1, 2, 0).contiguous()


def depthwise_conv3x3(x: torch.Tensor, taps: torch.Tensor, bias: torch.Tensor | None = None, *, gelu: bool = False,
                      residual: bool = False) -> torch.Tensor:
    """``act(depthwise_conv3x3(x) + bias)``, plus ``x`` when ``residual``; ``act`` the exact GELU when ``gelu``.

    ``x`` is ``(B, C, H, W)`` (channels-last is read without a copy), ``taps`` ``(3, 3, C)`` (``depthwise_taps``
    of a conv weight), ``bias`` ``(C,)``; the result is channels-last in x's dtype, rounded where the unfused
    ``x + gelu(conv(x))`` rounds. No autograd.
    """
    _check(x, taps, bias)
    return torch.ops.rfsr.depthwise_conv3x3(x, taps, bias, bool(gelu), bool(residual))
