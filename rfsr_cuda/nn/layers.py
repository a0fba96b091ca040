"""SST's building blocks other than attention: norm, FFN, transformer layer, residual block, upsampler.

Attribute names follow the official modules (``norm_attn``, ``ffn.proj``/``dwc``/``agg``, ``upsampler.up_conv``...)
so the official state-dict keys load unchanged.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .attention import RIBWindowAttention
from .rib import (check_positive_int, conv1x1, depthwise3x3, grow_conv, has_forward_hooks, needs_grad,
                  op_may_replace, padded_width, use_depthwise_op, zero_padded)

UPSAMPLER_TYPES = ("pixelshuffle_direct", "pixelshuffle", "nn+conv")


def _channels(t: torch.Tensor, n: int) -> torch.Tensor:
    """The first n channels of (B, C, H, W) t (the real ones of the padded layout)."""
    return t if t.shape[1] == n else t[:, :n]


class LayerNorm2d(nn.Module):
    """LayerNorm over the channels of a ``(B, C, H, W)`` tensor (eps 1e-6, affine), as SST's channels-first LN.

    ``use_op()`` (inference, ``SST.prepare_inference``) moves it to the ``rfsr::layer_norm`` op: one pass over
    channels-last rows, optionally fused with the residual add before it (``add_norm``), and an output ``width``
    above C whose extra channels are zero, so the GEMMs after it read 16-byte-aligned rows (SST's 180 channels).
    """

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))
        self.eps = eps
        self.dim = dim  # the normalised channels (weight and bias may be zero-padded past them: pad_input)
        self.fused = False
        self.width = dim

    def use_op(self, width: int | None = None) -> "LayerNorm2d":
        """Normalise through ``rfsr::layer_norm`` into ``width`` >= C channels (extra channels zero). No autograd:
        for inference."""
        width = self.width if width is None else check_positive_int(width, "width")
        if width < self.weight.shape[0]:
            raise ValueError(f"width must be >= the {self.weight.shape[0]} channels, got {width}")
        self.fused, self.width = True, width
        return self

    def pad_input(self, width: int) -> None:
        """Also take inputs of ``width`` >= dim channels whose extra ones are zero (a channel-padded residual stream,
        ``SST.pad_channels``): weight and bias are zero-padded to ``width``, so the op reads whole 16-byte-aligned
        rows and takes its statistics from the first dim. For inference only (changes the parameter shapes)."""
        width = check_positive_int(width, "width")
        if width < self.dim:
            raise ValueError(f"width must be >= the {self.dim} channels, got {width}")
        with torch.no_grad():
            self.weight = zero_padded(self.weight, (width,))
            self.bias = zero_padded(self.bias, (width,))
        self.width = max(self.width, width)

    def _op(self, x: torch.Tensor) -> bool:
        # the op has no autograd formula: anything that needs gradients takes the ATen route
        return self.fused and not needs_grad(x, self.weight, self.bias)

    def _op_params(self, C: int) -> tuple[torch.Tensor, torch.Tensor, int | None]:
        """Weight, bias and norm_cols for rows of C channels: the padded parameters for padded rows, the first dim
        for unpadded ones."""
        if C == self.weight.shape[0]:
            return self.weight, self.bias, self.dim if C != self.dim else None
        if C == self.dim:
            return self.weight[:C], self.bias[:C], None
        raise ValueError(f"x must have {self.dim} channels ({self.weight.shape[0]} zero-padded), got {C}")

    def _aten(self, s: torch.Tensor) -> torch.Tensor:
        d = self.dim
        w, b, _ = self._op_params(d)
        out = F.layer_norm(_channels(s, d).permute(0, 2, 3, 1), (d,), w, b, self.eps)
        if self.width > out.shape[-1]:
            out = F.pad(out, (0, self.width - out.shape[-1]))
        return out.permute(0, 3, 1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._op(x):
            w, b, n = self._op_params(x.shape[1])
            return torch.ops.rfsr.layer_norm(x.permute(0, 2, 3, 1), w, b, self.eps, self.width, n).permute(0, 3, 1, 2)
        return self._aten(x)

    def add_norm(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(s, norm(s))`` for ``s = x + y``; ``y`` may have extra channels past x's (the padded layout; ignored)."""
        C = x.shape[1]
        if self._op(x) and op_may_replace(self, y):  # (hooks on this norm run through its call below)
            w, b, n = self._op_params(C)
            normed, s = torch.ops.rfsr.add_layer_norm(x.permute(0, 2, 3, 1), y.permute(0, 2, 3, 1)[..., :C],
                                                      w, b, self.eps, self.width, n)
            return s.permute(0, 3, 1, 2), normed.permute(0, 3, 1, 2)
        s = x + _channels(y, C)
        return s, self(s)

    def extra_repr(self) -> str:
        return f"{self.dim}, eps={self.eps}" + (f", fused, width={self.width}" if self.fused else "")


class ConvFFN(nn.Module):
    """1×1 expand + GELU, a residual depthwise 3×3 + GELU, 1×1 project. Hidden width ``int(dim·exp_ratio)``."""

    def __init__(self, dim: int, exp_ratio: float = 2.0):
        super().__init__()
        hidden = int(dim * exp_ratio)
        if hidden < 1:
            raise ValueError(f"exp_ratio must give a hidden width int(dim*exp_ratio) >= 1, got {exp_ratio!r} "
                             f"for dim {dim}")
        self.proj = nn.Conv2d(dim, hidden, 1)
        self.dwc = nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden)
        self.agg = nn.Conv2d(hidden, dim, 1)

    def pad_hidden(self, multiple: int = 8) -> None:
        """Zero-pad the hidden width to a multiple of ``multiple`` (SST's 180·1.25 = 225 channels make GEMMs with
        2-byte-aligned rows, which tensor cores run several times slower). The function is unchanged: the extra
        channels have zero weights and biases, stay 0 through GELU (gelu(0) = 0) and the residual depthwise conv,
        and ``agg`` gives them zero weights. Changes the parameter shapes: for inference only."""
        hidden = self.proj.out_channels
        extra = -hidden % check_positive_int(multiple, "multiple")
        if not extra:
            return
        p, d, a = self.proj.weight, self.dwc.weight, self.agg.weight
        with torch.no_grad():
            self.proj.weight = zero_padded(p, (hidden + extra, *p.shape[1:]))
            self.proj.bias = zero_padded(self.proj.bias, (hidden + extra,))
            self.dwc.weight = zero_padded(d, (hidden + extra, *d.shape[1:]))
            self.dwc.bias = zero_padded(self.dwc.bias, (hidden + extra,))
            self.agg.weight = zero_padded(a, (a.shape[0], hidden + extra, *a.shape[2:]))
        hidden += extra
        self.proj.out_channels = self.dwc.in_channels = self.dwc.out_channels = self.dwc.groups = hidden
        self.agg.in_channels = hidden

    def pad_io(self, width: int) -> None:
        """Take ``width`` >= dim input channels (extra ones ignored: zero weights) and give ``width`` output channels
        (extra ones zero): the padded layout of ``SSTLayer.pad_channels``. For inference only."""
        grow_conv(self.proj, in_channels=width)
        grow_conv(self.agg, out_channels=width)

    def use_op(self) -> None:
        """Run ``x + gelu(dwc(x))`` as one ``rfsr::depthwise_conv3x3`` call (taps taken from the weights now, in
        float32; no autograd): for inference, after any change to the weights (``SST.prepare_inference``). While
        ``dwc`` has forward hooks, or gradients are needed, the modules run as they are."""
        use_depthwise_op(self.dwc)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (the first GELU stays a separate pass: inside the depthwise op's tile load it measured slower on an H200,
        # which has the bandwidth for it and not the erf throughput)
        x = F.gelu(conv1x1(x, self.proj))
        return conv1x1(depthwise3x3(self.dwc, x, gelu=True, residual=True), self.agg)


class SSTLayer(nn.Module):
    """Pre-norm transformer layer: ``x + attn(LN(x))`` then ``x + ffn(LN(x))`` (the official ``STL``)."""

    def __init__(self, dim: int, window_size: int, num_heads: int, rank: int, *, shift: bool = False,
                 exp_ratio: float = 2.0, gate_type: str | None = "DWC", rib_hidden_dim: int = 32,
                 rib_n_freqs: int = 10, attn_backend: str = "fused"):
        super().__init__()
        self.norm_attn = LayerNorm2d(dim)
        self.attn = RIBWindowAttention(dim, window_size, num_heads, rank, shift=shift, gate_type=gate_type,
                                       rib_hidden_dim=rib_hidden_dim, rib_n_freqs=rib_n_freqs,
                                       attn_backend=attn_backend)
        self.norm_ffn = LayerNorm2d(dim)
        self.ffn = ConvFFN(dim, exp_ratio)

    def pad_channels(self, multiple: int = 8) -> None:
        """Inference layout for a width that is not a multiple of ``multiple`` (SST's 180): both norms write
        ``padded_width(dim)`` channels, the extra ones zero, and the attention and the FFN take and return that many
        (zero weights on the extra inputs, zero outputs), so every 1×1 GEMM reads and writes 16-byte-aligned rows;
        cuBLAS runs the 2-byte-aligned ones several times slower. The residual stream keeps its width here
        (``SST.pad_channels`` pads it too). The function is unchanged. Needs the norms on the op
        (``LayerNorm2d.use_op``); for inference only."""
        dim = self.norm_attn.dim
        width = padded_width(dim, check_positive_int(multiple, "multiple"))
        if width == dim:
            return
        self.norm_attn.use_op(width)
        self.norm_ffn.use_op(width)
        self.attn.pad_channels(width, multiple)
        self.ffn.pad_io(width)

    def forward_deferred(self, x: torch.Tensor, pending: torch.Tensor | None = None
                         ) -> tuple[torch.Tensor, torch.Tensor]:
        """This layer on ``x + pending`` (``x`` when None), returning ``(s, f)`` whose sum ``s + f`` is the output:
        each residual add is left to the LayerNorm that follows it (``add_norm``, one pass on the op route), the
        next layer's included (SSTBlock). ``pending`` and ``f`` may carry extra zero channels (pad_channels)."""
        if pending is None:
            h = self.norm_attn(x)
        else:
            x, h = self.norm_attn.add_norm(x, pending)
        x, h = self.norm_ffn.add_norm(x, self.attn(h))
        return x, self.ffn(h)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, f = self.forward_deferred(x)
        return x + _channels(f, x.shape[1])


class SSTBlock(nn.Sequential):
    """One residual group (the official ``SSTB``): a layer per window size, then a 3×3 conv, plus the input.

    Layers shift (odd ones, by half a window) only when all window sizes are equal: with cyclic window sizes the
    changing window grid already mixes across borders. The layers run through ``SSTLayer.forward_deferred``, which
    leaves each FFN's residual add to the next layer's first LayerNorm (same function); with forward hooks on a layer,
    the layers run one by one through their calls.
    """

    def __init__(self, dim: int, window_sizes: Sequence[int], num_heads: Sequence[int], ranks: Sequence[int], *,
                 exp_ratio: float = 2.0, gate_type: str | None = "DWC", rib_hidden_dim: int = 32,
                 rib_n_freqs: int = 10, attn_backend: str = "fused"):
        if not (len(window_sizes) == len(num_heads) == len(ranks)):
            raise ValueError(f"window_sizes, num_heads and ranks must have one entry per layer, got lengths "
                             f"{len(window_sizes)}, {len(num_heads)}, {len(ranks)}")
        use_shift = all(ws == window_sizes[0] for ws in window_sizes)
        super().__init__(*[
            SSTLayer(dim, ws, nh, r, shift=use_shift and i % 2 == 1, exp_ratio=exp_ratio, gate_type=gate_type,
                     rib_hidden_dim=rib_hidden_dim, rib_n_freqs=rib_n_freqs, attn_backend=attn_backend)
            for i, (ws, nh, r) in enumerate(zip(window_sizes, num_heads, ranks))
        ], nn.Conv2d(dim, dim, 3, padding=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        layers = list(self)[:-1]
        if any(has_forward_hooks(layer) for layer in layers):  # hooks see every layer's own input and output
            return x + super().forward(x)
        h, f = x, None
        for layer in layers:
            h, f = layer.forward_deferred(h, f)
        return x + self[-1](h + _channels(f, h.shape[1]))


def check_upsampler(upsampler_type, upscaling_factor) -> None:
    if upsampler_type not in UPSAMPLER_TYPES:
        raise ValueError(f"upsampler_type must be one of {UPSAMPLER_TYPES}, got {upsampler_type!r}")
    r = check_positive_int(upscaling_factor, "upscaling_factor")
    if upsampler_type == "nn+conv" and r != 3 and r & (r - 1):
        raise ValueError(f"upscaling_factor must be a power of 2 or 3 for upsampler_type 'nn+conv', got {r}")


class Upsampler(nn.Module):
    """SST's single-stage upsamplers; ``forward(feat, skip)`` adds a nearest-neighbour copy of the LR image.

    * 'pixelshuffle_direct': ``up_conv`` 3×3 dim→3r², + skip repeated r² times per channel, pixel shuffle.
    * 'pixelshuffle': ``feature_conv`` 3×3 dim→nf + LeakyReLU(0.1), ``up_conv`` nf→nf·r², pixel shuffle,
      ``final_conv`` nf→3, + nearest-upsampled skip. One ×r stage (not SwinIR's ×2 stages), so ``up_conv`` can
      be resized between scales (``resize_up_conv``).
    * 'nn+conv': nearest ×2 (or ×3) upsampling + conv stages ``f``, with an image branch ``f_img``.
    """

    def __init__(self, dim: int, upscaling_factor: int, upsampler_type: str = "pixelshuffle_direct",
                 intermediate_dim: int = 64):
        super().__init__()
        check_upsampler(upsampler_type, upscaling_factor)
        self.upscaling_factor = r = upscaling_factor
        self.upsampler_type = upsampler_type
        nf = check_positive_int(intermediate_dim, "intermediate_dim")
        if upsampler_type == "pixelshuffle_direct":
            self.up_conv = nn.Conv2d(dim, 3 * r * r, 3, padding=1)
        elif upsampler_type == "pixelshuffle":
            self.feature_conv = nn.Conv2d(dim, nf, 3, padding=1)
            self.up_conv = nn.Conv2d(nf, nf * r * r, 3, padding=1)
            self.final_conv = nn.Conv2d(nf, 3, 3, padding=1)
        else:  # 'nn+conv'
            steps = [3] if r == 3 else [2] * int(math.log2(r))
            f = [nn.Conv2d(dim, nf, 3, padding=1), nn.LeakyReLU(0.1)]
            for s in steps:
                f += [nn.Upsample(scale_factor=s, mode="nearest"), nn.Conv2d(nf, nf, 3, padding=1), nn.LeakyReLU(0.1)]
            self.f = nn.Sequential(*f, nn.Conv2d(nf, 3, 3, padding=1))
            self.f_img = nn.Sequential(nn.Conv2d(3, dim, 1), nn.Conv2d(dim, dim, 7, padding=3), nn.LeakyReLU(0.1),
                                       nn.Conv2d(dim, dim, 1))

    def fold(self, dtype: torch.dtype | None = None) -> None:
        """For 'pixelshuffle': precompute the one 5×5 conv (nf → 3r² sub-pixel channels, at LR) that equals
        ``up_conv``, the pixel shuffle and ``final_conv`` (all linear) away from the image border, in float64 from
        the weights now (non-persistent buffers, in ``dtype``, the weights' by default, channels-last): for
        inference, after any change to the weights (``SST.prepare_inference``). The forward then skips the
        nf·r²-channel LR map, its shuffled copy and the HR 3×3 conv (9× fewer multiply-adds), and recomputes only
        the outermost ring of output pixels the original way (there ``final_conv`` sees the HR map's zero padding,
        which the folded conv cannot). It steps aside for gradients and for forward hooks on the three convs.
        Other upsampler types: nothing to fold."""
        if self.upsampler_type != "pixelshuffle":
            return
        r, up, fin = self.upscaling_factor, self.up_conv, self.final_conv
        nf = up.in_channels
        uw = up.weight.detach().double().reshape(nf, r, r, nf, 3, 3)  # (c, i', j', input, ky, kx)
        ub = up.bias.detach().double().reshape(nf, r, r)
        fw, fb = fin.weight.detach().double(), fin.bias.detach().double()  # (o, c, dy, dx), (o,)
        out_c = fw.shape[0]
        k = uw.new_zeros(out_c, r, r, nf, 5, 5)
        b = fb[:, None, None].repeat(1, r, r)
        # output sub-pixel (i, j) tap (dy, dx) reads HR row r·y + i + dy - 1 = r·(y + a) + i2, i.e. up_conv's
        # sub-pixel (i2, j2) at LR offset (a, b); its 3×3 taps then land at LR offsets a - 1 .. a + 1
        for i in range(r):
            for dy in range(3):
                a, i2 = divmod(i + dy - 1, r)
                for j in range(r):
                    for dx in range(3):
                        bb, j2 = divmod(j + dx - 1, r)
                        k[:, i, j, :, a + 1:a + 4, bb + 1:bb + 4] += torch.einsum(
                            "oc,cnyx->onyx", fw[:, :, dy, dx], uw[:, i2, j2])
                        b[:, i, j] += fw[:, :, dy, dx] @ ub[:, i2, j2]
        dtype = dtype or up.weight.dtype
        self.register_buffer("_fold_w", k.reshape(out_c * r * r, nf, 5, 5).to(dtype).contiguous(
            memory_format=torch.channels_last), persistent=False)
        self.register_buffer("_fold_b", b.reshape(-1).to(dtype), persistent=False)

    def _folded(self, x: torch.Tensor) -> bool:
        return getattr(self, "_fold_w", None) is not None and min(x.shape[-2:]) >= 3 and not needs_grad(x) and \
            not any(has_forward_hooks(m) for m in (self.feature_conv, self.up_conv, self.final_conv))

    def _pixelshuffle(self, f: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        """The unfolded 'pixelshuffle' tail on features ``f`` (after feature_conv and LeakyReLU)."""
        r = self.upscaling_factor
        return self.final_conv(F.pixel_shuffle(self.up_conv(f), r)) + F.interpolate(skip, scale_factor=r,
                                                                                       mode="nearest")

    def _pixelshuffle_folded(self, f: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        out = shuffle_add(F.conv2d(f, self._fold_w, self._fold_b, padding=2), skip, self.upscaling_factor)
        # the outermost output ring the original way, on 3-pixel LR strips (all the ring's receptive field: the
        # strips' own zero padding stands where the image border is, and their cut edge is out of reach)
        n = len(f)
        rows = self._pixelshuffle(torch.cat([f[..., :3, :], f[..., -3:, :]]),
                                  torch.cat([skip[..., :3, :], skip[..., -3:, :]]))
        cols = self._pixelshuffle(torch.cat([f[..., :3], f[..., -3:]]), torch.cat([skip[..., :3], skip[..., -3:]]))
        out[..., 0, :], out[..., -1, :] = rows[:n, :, 0], rows[n:, :, -1]
        out[..., 0], out[..., -1] = cols[:n, ..., 0], cols[n:, ..., -1]
        return out

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        r = self.upscaling_factor
        if self.upsampler_type == "pixelshuffle_direct":
            return shuffle_add(self.up_conv(x), skip, r)
        if self.upsampler_type == "pixelshuffle":
            folded = self._folded(x)
            f = F.leaky_relu(self.feature_conv(x), 0.1)
            return self._pixelshuffle_folded(f, skip) if folded else self._pixelshuffle(f, skip)
        return self.f(x + self.f_img(skip.to(self.f_img[0].weight.dtype)))  # a bf16 model, float32 image

    def extra_repr(self) -> str:
        return f"upscaling_factor={self.upscaling_factor}, upsampler_type={self.upsampler_type!r}"


def shuffle_add(y: torch.Tensor, skip: torch.Tensor, r: int) -> torch.Tensor:
    """``pixel_shuffle(y + repeat_interleave(skip, r², dim=1), r)``: sub-pixel channels ``(B, C·r², h, w)`` plus a
    nearest-neighbour copy of ``skip (B, C, h, w)``, as ``(B, C, r·h, r·w)`` in their promoted dtype. Without
    autograd, one pass that writes the contiguous result (the three ops copy the r²-times larger map twice)."""
    B, Cr2, h, w = y.shape
    C = Cr2 // (r * r)
    if needs_grad(y, skip) or skip.shape != (B, C, h, w):
        return F.pixel_shuffle(y + torch.repeat_interleave(skip, r * r, dim=1), r)
    s6, y6 = skip[:, :, :, None, :, None], y.view(B, C, r, r, h, w).permute(0, 1, 4, 2, 5, 3)
    if torch.compiler.is_compiling():  # inductor fuses the reshape's copy into the add itself
        return (s6 + y6).reshape(B, C, h * r, w * r)
    out = y.new_empty((B, C, h, r, w, r), dtype=torch.promote_types(y.dtype, skip.dtype))
    return torch.add(s6, y6, out=out).view(B, C, h * r, w * r)


def up_conv_scale(upsampler_type: str, weight: torch.Tensor) -> int:
    """The scale an ``up_conv`` weight was made for: its outputs are (3 or nf)·r² sub-pixel channels."""
    oc, ic = weight.shape[:2]
    r2 = oc / 3 if upsampler_type == "pixelshuffle_direct" else oc / ic
    return int(round(math.sqrt(r2)))


def resize_up_conv(weight: torch.Tensor, bias: torch.Tensor, scale_in: int, scale_out: int
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Resize an ``up_conv`` from ×scale_in to ×scale_out, as the official loader does between scales.

    Output channel ``c·r² + i·r + j`` feeds sub-pixel (i, j) of channel c after the pixel shuffle; each (c, input
    channel, tap) r×r grid of weights, and each channel's r×r grid of biases, is resized bilinearly
    (align_corners=False) to the new r×r.
    """
    oc, ic, kh, kw = weight.shape
    c = oc // scale_in ** 2
    w = weight.reshape(c, scale_in, scale_in, ic * kh * kw).permute(3, 0, 1, 2)  # (ic·kh·kw, c, r, r)
    w = F.interpolate(w, size=(scale_out, scale_out), mode="bilinear", align_corners=False)
    w = w.permute(1, 2, 3, 0).reshape(c * scale_out ** 2, ic, kh, kw)
    b = F.interpolate(bias.reshape(1, c, scale_in, scale_in), size=(scale_out, scale_out), mode="bilinear",
                      align_corners=False).reshape(-1)
    return w.contiguous(), b
