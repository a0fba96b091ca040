"""The Python face of ``torch.ops.rfsr.flash_rfbias``: fake (meta) kernels and the autograd formula.

The schema lives in csrc/rfbias_op.cpp; CPU and CUDA kernels are registered from C++. ``flash_rfbias`` is a
composite over ``flash_rfbias_fwd`` (returns out and the log-sum-exp), whose backward is ``flash_rfbias_bwd``.
"""
from __future__ import annotations

import os

import torch

from . import _checks


def _load_library() -> None:
    try:
        from rfsr_cuda import _C  # noqa: F401  (loading the library runs the op registrations)
    except ImportError as e:  # pragma: no cover - depends on the install
        raise ImportError(
            "rfsr_cuda._C is not built. Install the package with `pip install --no-build-isolation .` "
            "from the source tree (it compiles against the torch in this environment)."
        ) from e


_load_library()


@torch.library.register_fake("rfsr::flash_rfbias_fwd")
def _fwd_fake(q, k, v, bias_q, bias_k, scale):
    B, N, H, D, _, _ = _checks.check_fwd_inputs(q, k, v, bias_q, bias_k)
    _checks.check_scale(scale)
    out = q.new_empty((B, N, H, D))
    lse = q.new_empty((B, H, N), dtype=_checks.lse_dtype_for(q.dtype))
    return out, lse


@torch.library.register_fake("rfsr::flash_rfbias_bwd")
def _bwd_fake(grad_out, q, k, v, bias_q, bias_k, out, lse, scale):
    _checks.check_fwd_inputs(q, k, v, bias_q, bias_k, unit_stride=False)
    _checks.check_bwd_inputs(grad_out, q, out, lse)
    _checks.check_scale(scale)
    return (torch.empty_like(q, memory_format=torch.contiguous_format),
            torch.empty_like(k, memory_format=torch.contiguous_format),
            torch.empty_like(v, memory_format=torch.contiguous_format),
            torch.empty_like(bias_q, memory_format=torch.contiguous_format),
            torch.empty_like(bias_k, memory_format=torch.contiguous_format))


def _setup_context(ctx, inputs, output):
    q, k, v, bias_q, bias_k, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, bias_q, bias_k, out, lse)
    ctx.scale = scale
    ctx.mark_non_differentiable(lse)


def _backward(ctx, grad_out, grad_lse):
    # flash_rfbias_bwd takes any strides (under torch.compile the saved tensors may come back re-strided)
    q, k, v, bias_q, bias_k, out, lse = ctx.saved_tensors
    grad_out = torch.zeros_like(out) if grad_out is None else grad_out
    grads = torch.ops.rfsr.flash_rfbias_bwd(grad_out, q, k, v, bias_q, bias_k, out, lse, ctx.scale)
    return (*grads, None)


torch.library.register_autograd("rfsr::flash_rfbias_fwd", _backward, setup_context=_setup_context)


def flash_rfbias(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias_q: torch.Tensor, bias_k: torch.Tensor,
                 scale: float | None = None) -> torch.Tensor:
    """Attention with a rank-factorised bias, fused: ``softmax(scale·q·kᵀ + bias_q·bias_kᵀ)·v`` per (batch, head).

    Args:
        q, k, v: ``(B, N, H, D)`` (batch·windows, tokens, heads, head dim); any strides with unit last-dim stride.
        bias_q, bias_k: ``(H, N, R)`` shared by every batch element, or ``(B, H, N, R)``; ``R`` may be 0.
            Fold any bias scale (RIB's ``R**-0.5``) into ``bias_q`` before the call.
        scale: logit scale of ``q·kᵀ``; ``D**-0.5`` when None.

    Returns ``(B, N, H, D)`` in q's dtype. Differentiable in all five tensors; gradients of shared factors are
    summed over the batch.
    """
    return torch.ops.rfsr.flash_rfbias(q, k, v, bias_q, bias_k, scale)


def cuda_kernels_built(*ops: str) -> bool:
    """Whether this build registered CUDA kernels for the rfsr ops ``ops`` (names without ``rfsr::``); a CPU-only build
    of the extension has none. False where PyTorch cannot tell."""
    try:
        return all(torch._C._dispatch_has_kernel_for_dispatch_key(f"rfsr::{op}", "CUDA") for op in ops)
    except (AttributeError, RuntimeError):
        return False


_PATH_ENV = {"fwd": "RFSR_FWD_PATH", "bwd": "RFSR_BWD_PATH"}


def cuda_path_available(direction: str, path: str) -> bool:
    """Whether this build runs ``direction`` ('fwd' or 'bwd') of the op on kernel path ``path`` ('sm80' or 'sm90')
    on the current CUDA device: a tiny call (bf16, D = 30, R = 18) with ``RFSR_FWD_PATH`` / ``RFSR_BWD_PATH`` set to
    ``path``, which the binding refuses when the build or the device lacks that path. The variable's previous value
    is restored. False without CUDA."""
    if direction not in _PATH_ENV:
        raise ValueError(f"direction must be 'fwd' or 'bwd', got {direction!r}")
    if not torch.cuda.is_available():
        return False
    x = torch.zeros(1, 1, 1, 30, device="cuda", dtype=torch.bfloat16)
    f = torch.zeros(1, 1, 18, device="cuda", dtype=torch.bfloat16)
    name = _PATH_ENV[direction]
    old = os.environ.get(name)
    os.environ[name] = path
    try:
        if direction == "fwd":
            torch.ops.rfsr.flash_rfbias_fwd(x, x, x, f, f, 1.0)
        else:
            torch.ops.rfsr.flash_rfbias_bwd(x, x, x, x, f, f, x, torch.zeros(1, 1, 1, device="cuda"), 1.0)
        return True
    except (RuntimeError, ValueError):
        return False
    finally:
        if old is None:
            del os.environ[name]
        else:
            os.environ[name] = old
