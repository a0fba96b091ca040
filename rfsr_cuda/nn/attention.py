"""Window attention with a RIB positional bias (SST's attention layer).

Per layer: optional gate from the unpadded input; reflect-pad bottom/right to the window; optional cyclic shift
(no mask, as in the official code); 1×1 ``to_qkv`` computed channels-last; window partition
``(b h w) (wh ww) heads c``; attention with logits ``q·kᵀ/√D + bias_q·bias_kᵀ``; merge, unshift, crop; gate; 1×1
``to_out``.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..ops import flash_rfbias, flash_rfbias_concat, flash_rfbias_reference
from .rib import RIB, check_positive_int, no_autocast

ATTN_BACKENDS = ("fused", "concat", "reference")
GATE_TYPES = (None, "DWC", "Linear")

_OPS = {"fused": flash_rfbias, "concat": flash_rfbias_concat, "reference": flash_rfbias_reference}


def check_attn_backend(name) -> str:
    if name not in ATTN_BACKENDS:
        raise ValueError(f"attn_backend must be one of {ATTN_BACKENDS}, got {name!r}")
    return name


def check_gate_type(name):
    if name not in GATE_TYPES:
        raise ValueError(f"gate_type must be one of {GATE_TYPES}, got {name!r}")
    return name


def op_dtype(backend: str, device_type: str, act_dtype: torch.dtype) -> torch.dtype:
    """The dtype the attention op runs in for activations of ``act_dtype``.

    'reference' computes in float32 (float64 for float64 inputs). The fast routes keep the activation dtype,
    except float32 on CUDA: the kernels (ours and SDPA's flash/cuDNN) are bf16/fp16 only, and the official
    model also runs its attention in bf16 for float32 models.
    """
    if backend == "reference":
        return torch.float64 if act_dtype == torch.float64 else torch.float32
    if device_type == "cuda" and act_dtype == torch.float32:
        return torch.bfloat16
    return act_dtype


def _contiguous(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # At most one copy, fused with the cast. (``.to(same_dtype, memory_format=...)`` may return a permuted view.)
    return t.contiguous() if t.dtype == dtype else t.to(dtype, memory_format=torch.contiguous_format)


def _make_gate(gate_type, dim: int) -> nn.Module | None:
    # Indices match the official nn.Sequential so the checkpoint keys (gate.0.*, gate.1.*) line up.
    if gate_type == "DWC":
        return nn.Sequential(nn.Conv2d(dim, dim, 3, padding=1, groups=dim), nn.Conv2d(dim, dim, 1), nn.Sigmoid())
    if gate_type == "Linear":
        return nn.Sequential(nn.Conv2d(dim, dim, 1), nn.Sigmoid())
    return None


class RIBWindowAttention(RIB):
    """SST's window attention layer; input and output ``(B, dim, H, W)``, any H, W.

    It subclasses RIB (rather than holding one) so the RIB parameters sit directly on the layer, where the
    official checkpoints keep them (``attn.to_q``, not ``attn.rib.to_q``).

    Args:
        dim: channels. window_size: int or (Wh, Ww). num_heads: heads (``dim`` must be divisible by it).
        rank: RIB rank R. shift: roll by half a window before partitioning (no mask, as the official code).
        gate_type: 'DWC' (sigmoid(1×1(depthwise 3×3))), 'Linear' (sigmoid(1×1)) or None.
        rib_hidden_dim, rib_n_freqs: the RIB MLP width and Fourier octaves.
        attn_backend: 'fused' (``flash_rfbias``), 'concat' (the paper's concat + SDPA route) or 'reference'.
    """

    def __init__(self, dim: int, window_size: int | tuple[int, int], num_heads: int, rank: int, *,
                 shift: bool = False, gate_type: str | None = "DWC", rib_hidden_dim: int = 32,
                 rib_n_freqs: int = 10, attn_backend: str = "fused"):
        check_positive_int(dim, "dim")
        check_positive_int(num_heads, "num_heads")
        if dim % num_heads:
            raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads})")
        super().__init__(num_heads, rank, window_size, rib_hidden_dim, rib_n_freqs)
        self.dim = dim
        self.head_dim = dim // num_heads
        self.shift = bool(shift)
        self.gate_type = check_gate_type(gate_type)
        self.attn_backend = check_attn_backend(attn_backend)
        self.to_qkv = nn.Conv2d(dim, 3 * dim, 1)
        self.to_out = nn.Conv2d(dim, dim, 1)
        self.gate = _make_gate(gate_type, dim)

    def set_attn_backend(self, name: str) -> None:
        self.attn_backend = check_attn_backend(name)

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        bias_q, bias_k = self.factors(device=q.device, dtype=q.dtype)
        op = _OPS[self.attn_backend]
        if self.attn_backend == "reference":  # the oracle stays float32 under autocast too
            with no_autocast(q.device.type):
                return op(q, k, v, bias_q, bias_k, self.head_dim ** -0.5)
        return op(q, k, v, bias_q, bias_k, self.head_dim ** -0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.dim:
            raise ValueError(f"x must be (B, {self.dim}, H, W), got shape {list(x.shape)}")
        B, C, H, W = x.shape
        wh, ww = self.window_size
        gate = self.gate(x) if self.gate is not None else None
        pad_h, pad_w = -H % wh, -W % ww
        if pad_h >= H or pad_w >= W:
            raise ValueError(f"input {H}×{W} is too small for window {wh}×{ww}: reflect padding needs each side "
                             f"> half the window (at least {wh // 2 + 1}×{ww // 2 + 1})")
        if pad_h or pad_w:
            x = F.pad(x, (0, pad_w, 0, pad_h), mode="reflect")
        if self.shift:
            x = torch.roll(x, shifts=(-(wh // 2), -(ww // 2)), dims=(2, 3))
        Hp, Wp = H + pad_h, W + pad_w
        nh, nw, N = Hp // wh, Wp // ww, wh * ww

        # 1×1 conv as a GEMM over channels-last pixels: the channel dim ends up last with unit stride.
        qkv = F.linear(x.permute(0, 2, 3, 1), self.to_qkv.weight.flatten(1), self.to_qkv.bias)
        dtype = op_dtype(self.attn_backend, qkv.device.type, qkv.dtype)
        # Window partition (one copy, fused with any dtype cast; none when one window covers the map), then
        # q, k, v are strided views of it: (B·nh·nw, N, 3, heads, D)[:, :, i].
        qkv = qkv.view(B, nh, wh, nw, ww, 3 * C).permute(0, 1, 3, 2, 4, 5)
        qkv = _contiguous(qkv, dtype).view(B * nh * nw, N, 3, self.num_heads, -1)
        out = self._attend(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2])  # (B·nh·nw, N, heads, D)

        out = out.reshape(B, nh, nw, wh, ww, C).permute(0, 1, 3, 2, 4, 5)
        out = _contiguous(out, x.dtype).view(B, Hp, Wp, C)
        if self.shift:
            out = torch.roll(out, shifts=(wh // 2, ww // 2), dims=(1, 2))
        out = out[:, :H, :W]
        if gate is not None:
            out = out * gate.permute(0, 2, 3, 1)
        out = F.linear(out, self.to_out.weight.flatten(1), self.to_out.bias)
        return out.permute(0, 3, 1, 2)

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, {super().extra_repr()}, shift={self.shift}, gate_type={self.gate_type}, "
                f"attn_backend={self.attn_backend!r}")


def set_attn_backend(module: nn.Module, name: str) -> nn.Module:
    """Switch every RIBWindowAttention inside ``module`` to backend ``name``; returns ``module``."""
    check_attn_backend(name)
    for m in module.modules():
        if isinstance(m, RIBWindowAttention):
            m.set_attn_backend(name)
    return module
