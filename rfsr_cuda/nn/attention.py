"""Window attention with a RIB positional bias (SST's attention layer).

Per layer: optional gate from the input; 1×1 ``to_qkv`` as a GEMM over channels-last pixels; reflect-pad
bottom/right to the window, optional cyclic shift (no mask, as in the official code) and window partition
``(b h w) (wh ww) heads c`` in one gather; attention with logits ``q·kᵀ/√D + bias_q·bias_kᵀ`` on strided q, k, v
views of that buffer; merge, unshift and crop in one gather; gate; 1×1 ``to_out``.

The 1×1 projection runs before the padding and the shift: it acts on each pixel alone, so projecting the unpadded
map and then copying the padded/shifted pixels gives the same values with fewer pixels projected and one copy where
pad, roll and partition took three. Index vectors for the gathers are cached per input size (none under
``torch.compile``, where they are part of the graph); at inference the gathers and copies move 8-byte words
(``move_words``), not single bf16 values.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..ops import flash_rfbias, flash_rfbias_concat, flash_rfbias_reference
from .rib import (RIB, autocast_enabled, check_positive_int, conv1x1, depthwise3x3, grow_conv, has_forward_hooks,
                  move_words, needs_grad, no_autocast, padded_width, use_depthwise_op, zero_padded)

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
    if t.dtype == dtype:
        return move_words(t, torch.Tensor.contiguous)
    return t.to(dtype, memory_format=torch.contiguous_format)


def _axis_source(n: int, pad: int, window: int, shift: int, device) -> torch.Tensor:
    """For one axis of the padded, shifted map: the source pixel of every position, as (n_windows, window).

    Position i holds padded pixel (i + shift) mod (n + pad) (``torch.roll`` by -shift); padded pixel j >= n is
    the reflection 2(n − 1) − j (``F.pad`` mode 'reflect', padding at the end only).
    """
    p = n + pad
    pos = torch.arange(p, device=device)
    if shift:
        pos = (pos + shift) % p
    if pad:
        pos = torch.where(pos < n, pos, 2 * (n - 1) - pos)
    return pos.view(p // window, window)


def _axis_target(n: int, pad: int, window: int, shift: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """For every pixel 0..n−1 of one axis: (window index, offset in the window) of the shifted position that
    holds it, the inverse of ``_axis_source`` on the unpadded pixels."""
    pos = torch.arange(n, device=device)
    if shift:
        pos = (pos - shift) % (n + pad)
    return pos // window, pos % window


def _window_indices(H: int, W: int, wh: int, ww: int, shift: bool, device) -> tuple[torch.Tensor, ...]:
    pad_h, pad_w = -H % wh, -W % ww
    sh, sw = (wh // 2, ww // 2) if shift else (0, 0)
    rows, cols = _axis_source(H, pad_h, wh, sh, device), _axis_source(W, pad_w, ww, sw, device)
    (win_r, off_r), (win_c, off_c) = _axis_target(H, pad_h, wh, sh, device), _axis_target(W, pad_w, ww, sw, device)
    # broadcast shapes: partition -> (nh, nw, wh, ww), merge -> (H, W)
    return (rows[:, None, :, None], cols[None, :, None, :],
            win_r[:, None], win_c[None, :], off_r[:, None], off_c[None, :])


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
        self.width = dim  # channels in and out: more in the padded inference layout (pad_channels)
        self.window_ops = False  # partition and merge (with the gate) as rfsr::window_partition/_merge (use_op)
        self._indices: dict = {}  # (H, W, device) -> gather indices of _window_indices

    def _apply(self, fn, *args, **kwargs):
        self._indices = {}  # device-bound
        return super()._apply(fn, *args, **kwargs)

    def set_attn_backend(self, name: str) -> None:
        self.attn_backend = check_attn_backend(name)

    def pad_channels(self, width: int, multiple: int = 8) -> None:
        """Take and return ``width`` >= dim channels (the extra inputs get zero weights, the extra outputs are zero),
        and write q, k, v into rows of ``padded_width(3·dim, multiple)``: every 1×1 GEMM then has 16-byte-aligned
        rows (``SSTLayer.pad_channels``). The function is unchanged; for inference only."""
        C, width = self.dim, check_positive_int(width, "width")
        if width < C:
            raise ValueError(f"width must be >= dim ({C}), got {width}")
        qkv_width = padded_width(3 * C, check_positive_int(multiple, "multiple"))
        grow_conv(self.to_qkv, qkv_width, width)
        grow_conv(self.to_out, width, width)
        # the gate's extra channels come out as sigmoid(0) = 0.5: finite, and to_out gives them zero weights
        for conv in self.gate or ():
            if not isinstance(conv, nn.Conv2d):
                continue
            if conv.groups == 1:
                grow_conv(conv, width, width)
                continue
            with torch.no_grad():  # depthwise: one filter per channel
                conv.weight = zero_padded(conv.weight, (width, *conv.weight.shape[1:]))
                conv.bias = zero_padded(conv.bias, (width,))
            conv.in_channels = conv.out_channels = conv.groups = width
        self.width = width

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        bias_q, bias_k = self.factors(device=q.device, dtype=q.dtype)
        op = _OPS[self.attn_backend]
        if self.attn_backend == "reference":  # the oracle stays float32 under autocast too
            with no_autocast(q.device.type):
                return op(q, k, v, bias_q, bias_k, self.head_dim ** -0.5)
        return op(q, k, v, bias_q, bias_k, self.head_dim ** -0.5)

    def use_op(self) -> None:
        """Inference ops (no autograd; ``SST.prepare_inference``): the DWC gate's depthwise conv with its bias as
        ``rfsr::depthwise_conv3x3`` (taps taken from the weights now: call again after changing them), pad + shift +
        partition as one ``rfsr::window_partition``, and merge + unshift + crop with the gate's sigmoid and product as
        one ``rfsr::window_merge``. Where gradients are needed, or the gate's sigmoid has forward hooks, the modules and
        gathers run as they are."""
        if self.gate_type == "DWC":
            use_depthwise_op(self.gate[0])
        self.window_ops = True

    def _gate(self, x: torch.Tensor, activate: bool = True) -> torch.Tensor | None:
        # the Sequential of the official layout, its 1×1 conv as a GEMM (conv1x1); without `activate` the logits
        if self.gate is None:
            return None
        if self.gate_type == "DWC":
            logits = conv1x1(depthwise3x3(self.gate[0], x), self.gate[1])
        else:
            logits = conv1x1(x, self.gate[0])
        return self.gate[-1](logits) if activate else logits

    def _gather_indices(self, H: int, W: int, device) -> tuple[torch.Tensor, ...]:
        if torch.compiler.is_compiling():  # part of the graph: static shapes fold them into the gathers
            return _window_indices(H, W, *self.window_size, self.shift, device)
        key = (H, W, device)
        idx = self._indices.get(key)
        if idx is None:
            if len(self._indices) >= 16:  # many tile sizes: keep the most recent ones only
                self._indices.pop(next(iter(self._indices)))
            with torch.inference_mode(False):  # normal tensors, usable later in training too
                idx = self._indices[key] = _window_indices(H, W, *self.window_size, self.shift, device)
        return idx

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.width:
            raise ValueError(f"x must be (B, {self.width}, H, W), got shape {list(x.shape)}")
        B, _, H, W = x.shape
        C = self.dim
        wh, ww = self.window_size
        pad_h, pad_w = -H % wh, -W % ww
        if pad_h >= H or pad_w >= W:
            raise ValueError(f"input {H}×{W} is too small for window {wh}×{ww}: reflect padding needs each side "
                             f"> half the window (at least {wh // 2 + 1}×{ww // 2 + 1})")
        # rfsr::window_merge takes the gate's logits (it applies the sigmoid), unless the sigmoid module has hooks
        merge_op = self.window_ops and not (self.gate is not None and has_forward_hooks(self.gate[-1]))
        gate = self._gate(x, activate=not merge_op)
        Hp, Wp = H + pad_h, W + pad_w
        nh, nw, N = Hp // wh, Wp // ww, wh * ww
        act_dtype = x.dtype

        # 1×1 conv as a GEMM over channels-last pixels (a view when x is channels-last): the channel dim ends up
        # last with unit stride.
        qkv = F.linear(x.permute(0, 2, 3, 1), self.to_qkv.weight.flatten(1), self.to_qkv.bias)
        dtype = op_dtype(self.attn_backend, qkv.device.type, qkv.dtype)
        reindex = bool(pad_h or pad_w or self.shift)
        shift = [wh // 2, ww // 2] if self.shift else [0, 0]
        if self.window_ops and qkv.dtype == dtype and not needs_grad(qkv):
            # pad + shift + partition of the first 3·C columns (pad_channels' rows are wider): one pass
            windows = torch.ops.rfsr.window_partition(qkv, [wh, ww], shift, 3 * C)
        elif reindex:
            qkv = qkv[..., :3 * C]  # padded rows (pad_channels): q, k, v are the first 3·C columns
            rows, cols = self._gather_indices(H, W, qkv.device)[:2]
            # pad + shift + partition: one gather -> (B, nh, nw, wh, ww, 3C)
            windows = move_words(qkv.to(dtype), lambda t: t[:, rows, cols])
        else:  # partition only: one copy, fused with any dtype cast
            qkv = qkv[..., :3 * C]
            windows = _contiguous(qkv.unflatten(1, (nh, wh)).unflatten(3, (nw, ww)).permute(0, 1, 3, 2, 4, 5), dtype)
        # q, k, v are strided views of the partition buffer: (B·nh·nw, N, 3, heads, D)[:, :, i]
        windows = windows.view(B * nh * nw, N, 3, self.num_heads, -1)
        out = self._attend(windows[:, :, 0], windows[:, :, 1], windows[:, :, 2])  # (B·nh·nw, N, heads, D)

        if merge_op:
            if not needs_grad(out, gate) and out.dtype == act_dtype and (gate is None or gate.dtype == act_dtype):
                # merge + unshift + crop, times sigmoid(gate), into rows of `width`: one pass
                out = torch.ops.rfsr.window_merge(out.reshape(B * nh * nw, N, C), H, W, [wh, ww], shift,
                                                  None if gate is None else gate.permute(0, 2, 3, 1), self.width)
                return F.linear(out, self.to_out.weight.flatten(1), self.to_out.bias).permute(0, 3, 1, 2)
            if gate is not None:
                gate = self.gate[-1](gate)

        # windows and tokens split by a view whatever the op's output strides (the concat route's are not
        # contiguous): (B, nh, nw, wh, ww, heads, D)
        # (the fused op's output is contiguous: then heads and channels merge too, for word-wise gathers)
        out = out.view(B, nh, nw, wh, ww, C) if out.is_contiguous() \
            else out.view(B, nh, nw, wh, ww, self.num_heads, -1)
        autocast = autocast_enabled(out.device.type)
        padded = self.width != C
        if reindex:  # merge + unshift + crop: one gather -> (B, H, W, C)
            win_r, win_c, off_r, off_c = self._gather_indices(H, W, out.device)[2:]
            out = move_words(out, lambda t: t[:, win_r, win_c, off_r, off_c]).reshape(B, H, W, C)
            if padded:  # into rows of `width` for to_out, the gate's buffer when there is one
                out = self._into_padded(out, gate, B, H, W)
            elif gate is not None:
                out = out * gate.permute(0, 2, 3, 1)
        else:
            out = out.permute(0, 1, 3, 2, 4, 5, *range(6, out.dim()))  # (B, nh, wh, nw, ww, C or heads, D), a view
            if padded:
                out = self._into_padded(out, gate, B, H, W)
            elif gate is not None:  # the product is the merge copy (gate first: its layout is the output's)
                out = gate.permute(0, 2, 3, 1).reshape(out.shape) * out
            elif not autocast:
                out = _contiguous(out, act_dtype)  # the merge copy, fused with any cast back
            if not padded:
                out = out.reshape(B, H, W, C)
        if out.dtype != act_dtype and not autocast:  # (under autocast to_out casts anyway)
            out = out.to(act_dtype)  # e.g. bf16 attention in a float32 model
        out = F.linear(out, self.to_out.weight.flatten(1), self.to_out.bias)
        return out.permute(0, 3, 1, 2)

    def _into_padded(self, out: torch.Tensor, gate: torch.Tensor | None, B: int, H: int, W: int) -> torch.Tensor:
        """The attention output times the gate in the first C channels of (B, H, W, width) rows for to_out: the
        gate's own buffer (its extra channels are finite, and to_out gives them zero weights), else zeros. ``out`` is
        (B, H, W, C), or the merge view (B, nh, wh, nw, ww, C or heads, D) of an unpadded window grid."""
        buf = gate.permute(0, 2, 3, 1) if gate is not None else out.new_zeros((B, H, W, self.width))
        dst = buf if out.dim() == 4 else buf.view(*out.shape[:5], self.width)
        dst = dst[..., :self.dim]
        if out.dim() == 7:
            dst = dst.unflatten(-1, out.shape[5:])
        if gate is None:
            dst.copy_(out)
        else:
            dst.mul_(out)
        return buf

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
