"""SST, the Scalable SR Transformer with RIB window attention: ``SSTConfig`` and the ``SST`` model.

``SST(**kwargs)`` takes the official constructor keywords (so the official configs work unchanged) plus rfsr's
``attn_backend``; parameter names equal the official state-dict keys.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.nn as nn

from ..nn import ConvFFN, LayerNorm2d, SSTBlock, SSTLayer, Upsampler
from ..nn import set_attn_backend as _set_attn_backend
from ..nn.attention import RIBWindowAttention, check_attn_backend, check_gate_type
from ..nn.layers import check_upsampler
from ..nn.rib import autocast_enabled, check_positive_int, grow_conv, padded_width


def _per_layer(value, n: int, name: str) -> tuple[int, ...]:
    """An int (same for every layer) or one positive int per window size -> tuple."""
    if isinstance(value, int) and not isinstance(value, bool):
        value = [value] * n
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise TypeError(f"{name} must be an int or a sequence of ints (one per window size), got {value!r}")
    if len(value) != n:
        raise ValueError(f"{name} must have one entry per window size ({n}), got {len(value)}: {list(value)}")
    for v in value:
        check_positive_int(v, f"every entry of {name}")
    return tuple(value)


@dataclass(frozen=True)
class SSTConfig:
    """Architecture of an SST model. Field names and defaults are those of the official ``SST`` constructor;
    ``attn_backend`` is rfsr's choice of attention route and does not change the function.

    ``window_sizes``: one layer per entry in every block (cycled window sizes); ``num_heads`` and ``ranks`` are
    per layer (an int means the same for all). Sequences are stored as tuples.
    """

    dim: int
    window_sizes: Sequence[int]
    num_heads: Sequence[int] | int
    n_blocks: int
    exp_ratio: float = 2.0
    attn_type: str = "RIB"
    rib_hidden_dim: int = 64
    rib_n_freqs: int = 10
    upscaling_factor: int = 2
    upsampler_type: str = "pixelshuffle_direct"
    ranks: Sequence[int] | int | None = None
    gate_type: str | None = None
    intermediate_dim: int = 64
    attn_backend: str = "fused"

    def __post_init__(self):
        check_positive_int(self.dim, "dim")
        if isinstance(self.window_sizes, (str, bytes)) or not isinstance(self.window_sizes, Sequence) \
                or not self.window_sizes:
            raise TypeError(f"window_sizes must be a non-empty sequence of ints, got {self.window_sizes!r}")
        n = len(self.window_sizes)
        # normalised to tuples (the dataclass is frozen, hence object.__setattr__)
        object.__setattr__(self, "window_sizes", _per_layer(self.window_sizes, n, "window_sizes"))
        object.__setattr__(self, "num_heads", _per_layer(self.num_heads, n, "num_heads"))
        for h in self.num_heads:
            if self.dim % h:
                raise ValueError(f"dim ({self.dim}) must be divisible by every entry of num_heads, got {h}")
        check_positive_int(self.n_blocks, "n_blocks")
        if isinstance(self.exp_ratio, bool) or not isinstance(self.exp_ratio, (int, float)) \
                or int(self.dim * self.exp_ratio) < 1:
            raise ValueError(f"exp_ratio must be a number with int(dim * exp_ratio) >= 1, got {self.exp_ratio!r}")
        if self.attn_type != "RIB":
            raise ValueError(f"attn_type must be 'RIB' (the only positional scheme rfsr implements; the official "
                             f"NoPE/CPE/RPB/FlashBias/RIBSiren/RoPEViT baselines are not), got {self.attn_type!r}")
        if self.ranks is None:
            raise ValueError("ranks is required for attn_type 'RIB': one RIB rank per window size")
        object.__setattr__(self, "ranks", _per_layer(self.ranks, n, "ranks"))
        check_positive_int(self.rib_hidden_dim, "rib_hidden_dim")
        check_positive_int(self.rib_n_freqs, "rib_n_freqs", 0)
        check_upsampler(self.upsampler_type, self.upscaling_factor)
        check_gate_type(self.gate_type)
        check_positive_int(self.intermediate_dim, "intermediate_dim")
        check_attn_backend(self.attn_backend)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (lists for sequences); ``SSTConfig(**cfg.to_dict()) == cfg``."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "SSTConfig":
        return cls(**json.loads(text))

    def replace(self, **changes) -> "SSTConfig":
        return dataclasses.replace(self, **changes)

    @property
    def min_input_size(self) -> int:
        """Smallest LR side every layer can reflect-pad to its window (padding must be < the side)."""
        return max(self.window_sizes) // 2 + 1



class SST(nn.Module):
    """SST: ``proj`` 3×3 → ``body`` (n_blocks SSTBlocks, LayerNorm, 3×3 conv) with a global residual →
    ``upsampler`` with a nearest-neighbour skip of the LR input.

    ``SST(**kwargs)`` accepts ``SSTConfig``'s fields (the official constructor keywords + ``attn_backend``);
    ``SST.from_config(cfg)`` takes a config. Input ``(B, 3, h, w)`` in [0, 1], any h, w >= ``min_input_size``;
    output ``(B, 3, r·h, r·w)``.
    """

    def __init__(self, *args, **kwargs):
        super().__init__()
        self.config = cfg = SSTConfig(*args, **kwargs)
        block_args = dict(exp_ratio=cfg.exp_ratio, gate_type=cfg.gate_type, rib_hidden_dim=cfg.rib_hidden_dim,
                          rib_n_freqs=cfg.rib_n_freqs, attn_backend=cfg.attn_backend)
        self.proj = nn.Conv2d(3, cfg.dim, 3, padding=1)
        self.body = nn.Sequential(
            *[SSTBlock(cfg.dim, cfg.window_sizes, cfg.num_heads, cfg.ranks, **block_args)
              for _ in range(cfg.n_blocks)],
            LayerNorm2d(cfg.dim),
            nn.Conv2d(cfg.dim, cfg.dim, 3, padding=1),
        )
        self.upsampler = Upsampler(cfg.dim, cfg.upscaling_factor, cfg.upsampler_type, cfg.intermediate_dim)
        self.init_weights()

    @classmethod
    def from_config(cls, config: SSTConfig, **overrides) -> "SST":
        if not isinstance(config, SSTConfig):
            raise TypeError(f"config must be an SSTConfig, got {type(config).__name__}")
        return cls(**dataclasses.asdict(config.replace(**overrides) if overrides else config))

    def init_weights(self) -> None:
        """The official init: 1×1 convs trunc_normal(std 0.02), 3×3 convs PyTorch's default, all conv biases 0;
        LayerNorm 1/0 and RIB N(0, 0.05²) (hidden_b 0) come from their own constructors."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                if m.weight.shape[-1] == 1:
                    nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    @property
    def scale(self) -> int:
        return self.config.upscaling_factor

    @property
    def min_input_size(self) -> int:
        return self.config.min_input_size

    def set_attn_backend(self, name: str) -> "SST":
        """Switch every attention layer to ``name`` ('fused', 'concat' or 'reference'); returns self."""
        _set_attn_backend(self, name)
        self.config = self.config.replace(attn_backend=name)
        return self

    def prepare_inference(self, dtype: torch.dtype = torch.bfloat16) -> "SST":
        """Set the model up for fast inference and return it: eval mode, no gradients, the weights of every conv
        and LayerNorm in ``dtype`` (bf16 by default; the convs channels-last, the layout the activations use), the
        FFN hidden widths zero-padded to multiples of 8 (``ConvFFN.pad_hidden``, exact), LayerNorm through the
        ``rfsr::layer_norm`` op (fused with the residual adds before it), the depthwise convs through
        ``rfsr::depthwise_conv3x3`` (with their bias, and the FFN's GELU and residual), for widths that are not a
        multiple of 8 (SST's 180) every activation's rows padded to one (``pad_channels``, exact), and the
        'pixelshuffle' upsampler's two convs folded into one at the LR size (``Upsampler.fold``, exact).

        The RIB parameters stay float32: their factors are computed in float32 once and cached in the attention
        dtype. Activations then run in ``dtype`` end to end, with float32 inside the kernels where it matters
        (LayerNorm statistics, the softmax and its sums in the attention op, GEMM accumulation); the input is cast
        on entry, and the nearest-neighbour skip of the LR image is added in the input's dtype, so a float32 image
        gets a float32 output. This changes the parameters in place: for training or saving, build or load the
        model again (the padded FFN weights no longer match the config).
        """
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise TypeError(f"dtype must be a floating-point torch.dtype, got {dtype!r}")
        self.eval().requires_grad_(False)
        for m in self.modules():
            if isinstance(m, ConvFFN):
                m.pad_hidden(8)  # same function; aligned GEMM rows (SST's 225-wide hidden layer)
        for m in self.modules():
            if isinstance(m, LayerNorm2d):
                m.use_op()  # one pass per row (PyTorch's LayerNorm kernel is latency-bound on short rows)
        self.pad_channels(8)  # same function; aligned rows everywhere (SST's 180 channels)
        self.upsampler.fold(dtype)  # from the float32 weights, before the cast
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                m.to(dtype=dtype, memory_format=torch.channels_last)  # cuDNN/oneDNN would convert them per call
            elif isinstance(m, LayerNorm2d):
                m.to(dtype=dtype)
        for m in self.modules():  # after the cast: the ops get exactly the weights the modules hold
            if isinstance(m, (ConvFFN, RIBWindowAttention)):
                m.use_op()  # the depthwise convs with their bias, GELU and residual in one pass
        return self

    def pad_channels(self, multiple: int = 8) -> "SST":
        """For a width that is not a multiple of ``multiple`` (SST's 180): the residual stream carries
        ``padded_width(dim)`` channels whose extra ones are zero (``proj``, the blocks' and the body's 3×3 convs
        and the upsampler's first conv get zero weights for them), the norms take those rows whole and write as
        many (``LayerNorm2d.pad_input``), and every layer's 1×1 GEMMs read and write aligned rows
        (``SSTLayer.pad_channels``). Every activation row is then 16-byte aligned: cuDNN's 3×3 convs need no
        channel-padding passes, the residual adds and the norms read whole vectors. Same function; for inference
        only (changes the parameter shapes)."""
        dim = self.config.dim
        width = padded_width(dim, check_positive_int(multiple, "multiple"))
        if width == dim:
            return self
        for m in self.modules():
            if isinstance(m, SSTLayer):
                m.pad_channels(multiple)
            elif isinstance(m, LayerNorm2d):
                m.pad_input(width)
            elif isinstance(m, SSTBlock):
                grow_conv(m[-1], width, width)
        grow_conv(self.proj, out_channels=width)
        grow_conv(self.body[-1], width, width)
        up = self.upsampler
        if up.upsampler_type == "pixelshuffle_direct":
            grow_conv(up.up_conv, in_channels=width)
        elif up.upsampler_type == "pixelshuffle":
            grow_conv(up.feature_conv, in_channels=width)
        else:  # 'nn+conv': x + f_img(skip) feeds f
            grow_conv(up.f[0], in_channels=width)
            grow_conv(up.f_img[-1], out_channels=width)
        return self

    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype of the activations without autocast: that of the conv weights."""
        return self.proj.weight.dtype

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        feat = self.proj(x)
        return feat + self.body(feat)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"x must be an image batch (B, 3, H, W), got shape {list(x.shape)}")
        if min(x.shape[-2:]) < self.min_input_size:
            raise ValueError(f"x is {x.shape[-2]}×{x.shape[-1]}, but each side must be >= {self.min_input_size} "
                             f"for the window sizes {self.config.window_sizes} (reflect padding)")
        h = x
        if x.dtype != self.compute_dtype and not autocast_enabled(x.device.type):
            h = x.to(self.compute_dtype)
        # Channels-last activations: the convs keep the layout, and LayerNorm and the attention's 1×1 GEMMs then
        # read (B, H, W, C) views without copies.
        h = h.contiguous(memory_format=torch.channels_last)
        out = self.upsampler(self.forward_features(h), x)
        return out if out.dtype == x.dtype else out.to(x.dtype)
