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
from .rib import check_positive_int, conv1x1

UPSAMPLER_TYPES = ("pixelshuffle_direct", "pixelshuffle", "nn+conv")


class LayerNorm2d(nn.Module):
    """LayerNorm over the channels of a ``(B, C, H, W)`` tensor (eps 1e-6, affine), as SST's channels-first LN."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x.permute(0, 2, 3, 1), self.weight.shape, self.weight, self.bias, self.eps) \
            .permute(0, 3, 1, 2)


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

        def grown(t: torch.Tensor, dim: int) -> nn.Parameter:
            pad = t.new_zeros(*t.shape[:dim], extra, *t.shape[dim + 1:])
            return nn.Parameter(torch.cat([t.detach(), pad], dim), requires_grad=t.requires_grad)

        with torch.no_grad():
            self.proj.weight, self.proj.bias = grown(self.proj.weight, 0), grown(self.proj.bias, 0)
            self.dwc.weight, self.dwc.bias = grown(self.dwc.weight, 0), grown(self.dwc.bias, 0)
            self.agg.weight = grown(self.agg.weight, 1)
        hidden += extra
        self.proj.out_channels = self.dwc.in_channels = self.dwc.out_channels = self.dwc.groups = hidden
        self.agg.in_channels = hidden

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.gelu(conv1x1(x, self.proj))
        x = x + F.gelu(self.dwc(x))
        return conv1x1(x, self.agg)


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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm_attn(x))
        return x + self.ffn(self.norm_ffn(x))


class SSTBlock(nn.Sequential):
    """One residual group (the official ``SSTB``): a layer per window size, then a 3×3 conv, plus the input.

    Layers shift (odd ones, by half a window) only when all window sizes are equal: with cyclic window sizes the
    changing window grid already mixes across borders.
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
        return x + super().forward(x)


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

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        r = self.upscaling_factor
        if self.upsampler_type == "pixelshuffle_direct":
            return F.pixel_shuffle(self.up_conv(x) + torch.repeat_interleave(skip, r * r, dim=1), r)
        if self.upsampler_type == "pixelshuffle":
            x = F.pixel_shuffle(self.up_conv(F.leaky_relu(self.feature_conv(x), 0.1)), r)
            return self.final_conv(x) + F.interpolate(skip, scale_factor=r, mode="nearest")
        return self.f(x + self.f_img(skip.to(self.f_img[0].weight.dtype)))  # a bf16 model, float32 image

    def extra_repr(self) -> str:
        return f"upscaling_factor={self.upscaling_factor}, upsampler_type={self.upsampler_type!r}"


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
