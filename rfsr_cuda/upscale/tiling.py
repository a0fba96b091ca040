"""Tiled inference: the image stays in host memory, only tiles go to the device, overlaps are blended.

Every tile of an image is ``tile × tile`` LR pixels, ``tile`` a multiple of the model's *alignment* — the least
common multiple of its window sizes (64 for the SST presets) — and every tile origin is a multiple of the alignment,
so each window layout inside a tile is the one the model uses on the whole image (a tile shifted off that grid
changes the output everywhere inside it, not only at its borders). The last tile of a row/column starts at the first
aligned origin that lets it reach the image edge, so only its top-left part (``valid``) holds image pixels.

The rest is *not* made up by padding the image: SST pads nothing once; its convolutions zero-pad at the image edge and
each attention layer reflect-pads its own feature map to its window, so no input padding reproduces the image edge
(reflect-padding the input to the alignment changes the output near the bottom/right edges by up to 0.07 on a
smooth picture). Instead, while such a tile runs, forward pre-hooks give every layer what it would see for the valid
part alone: convolution inputs are zeroed outside it, attention inputs are reflected at its edge (as the layer's own
``F.pad(mode='reflect')`` would); windows beyond the valid part only hold copies and are cropped. So one tile shape
runs for the whole image (several tiles per forward, nothing re-tuned or recompiled per tile), and an edge tile
gives exactly what a tile cut to the image edge would. Shifted-window layers (equal window sizes) wrap around the
whole image, which no tiling reproduces. An image that fits in one tile runs whole, at its own size.

Neighbouring tiles overlap by ``overlap`` LR pixels; their outputs are blended with weights that ignore the outer
quarter of the overlap (least context), ramp as sin²/cos² across the middle half, normalised by the summed weights:
no seams, and the tiled output matches the untiled one up to the model's long-range interactions (tests check 1e-3
with the bundled SST-light weights).

On out-of-memory the batch shrinks to one tile, then the tile size halves (staying a multiple of the alignment) and
the *same* tile is redone in the smaller tiles (no tile is skipped or reused); later tiles and images keep the
smaller size. In fp16/bf16 every tile output is checked for NaN/Inf and a bad tile is redone in fp32.

Low precision on CUDA runs a prepared copy of an SST (``SST.prepare_inference``: bf16/fp16 weights and activations,
the fused LayerNorm and depthwise-conv ops, aligned GEMM rows), about twice as fast as the float32 model under
autocast; the float32 model stays for the redo. ``prepared=False`` keeps autocast (its residual stream is float32).
"""
from __future__ import annotations

import copy
import math
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "PRECISIONS",
    "TilePlan",
    "UpscaleStats",
    "Upscaler",
    "model_alignment",
    "plan_axis",
    "axis_weights",
    "resolve_precision",
    "resize_lanczos",
    "is_oom",
]

PRECISIONS = ("auto", "bf16", "fp16", "fp32")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
_LUMA = (0.299, 0.587, 0.114)  # ITU-R 601, as Pillow's RGB -> L


def is_oom(e: BaseException) -> bool:
    """A device (or host allocator) out-of-memory error."""
    if isinstance(e, torch.OutOfMemoryError):
        return True
    msg = str(e)
    return isinstance(e, RuntimeError) and ("out of memory" in msg or "can't allocate memory" in msg
                                            or "CUBLAS_STATUS_ALLOC_FAILED" in msg)


def resolve_precision(precision: Optional[str], device: torch.device) -> torch.dtype:
    """auto: bf16 on a CUDA GPU that supports it, else fp32 (CPU, older GPUs)."""
    precision = (precision or "auto").lower()
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    return _DTYPES[precision]


def _prepared_default(model: nn.Module, device: torch.device, dtype: torch.dtype) -> bool:
    """Whether ``prepared=None`` takes the prepared copy: CUDA, bf16/fp16, an SST-like model, and this build's CUDA
    kernels for the ops it uses (a CPU-only build of the extension has none)."""
    from ..ops import cuda_kernels_built

    if device.type != "cuda" or dtype == torch.float32 or not callable(getattr(model, "prepare_inference", None)):
        return False
    return cuda_kernels_built("flash_rfbias_fwd", "layer_norm", "add_layer_norm", "depthwise_conv3x3",
                              "window_partition", "window_merge")


def model_alignment(model: nn.Module) -> int:
    """The least common multiple of the model's window sizes (1 for a model without ``config.window_sizes``)."""
    sizes = getattr(getattr(model, "config", None), "window_sizes", None) or (1,)
    return math.lcm(*[int(s) for s in sizes])


def plan_axis(length: int, tile: int, overlap: int, align: int = 1) -> List[Tuple[int, int]]:
    """Tiles along one axis as (origin, valid size): origins 0, stride, 2·stride, … (stride = tile − overlap, a
    multiple of ``align`` when tile and overlap are) while a tile ends inside the axis, then a last tile from the
    smallest multiple of ``align`` that lets it reach ``length`` (its valid size is then in (tile − align, tile]).
    Keeping every origin a multiple of ``align`` keeps every window layout identical to the whole-image one. One tile
    (0, length) when ``tile`` covers the axis. Every tile is ``tile`` long; past its valid size it holds no pixels."""
    if tile >= length:
        return [(0, length)]
    stride = tile - overlap
    if stride <= 0:
        raise ValueError(f"overlap {overlap} must be smaller than the tile {tile}")
    origins = list(range(0, length - tile, stride))
    last = -(-(length - tile) // align) * align
    if last <= origins[-1]:  # (only when stride is not a multiple of align)
        last = length - tile
    origins.append(last)
    return [(o, min(tile, length - o)) for o in origins]


def _mirror_index(n: int, valid: int) -> torch.Tensor:
    """Source index of each of n positions when only the first ``valid`` exist: itself, then reflections about the
    last valid one without repeating it (``F.pad`` mode 'reflect'), periodically for any length."""
    j = torch.arange(n)
    if valid >= n:
        return j
    if valid == 1:
        return torch.zeros(n, dtype=torch.long)
    period = 2 * (valid - 1)
    m = j % period
    return torch.where(j < valid, j, torch.where(m < valid, m, period - m))


def _pad_tile(crop: torch.Tensor, tile: int) -> torch.Tensor:
    """(C, h, w) -> (C, tile, tile) with the crop top-left and mirrored copies beyond it (the model never sees
    them while ``_ValidRegion`` is active; a mirror keeps other models' guesses at the edge plausible)."""
    h, w = crop.shape[-2:]
    if h == tile and w == tile:
        return crop
    rows, cols = _mirror_index(tile, h).to(crop.device), _mirror_index(tile, w).to(crop.device)
    return crop.index_select(-2, rows).index_select(-1, cols)


class _ValidRegion:
    """While active, a batch of equal tiles whose samples hold real pixels only in their top-left (vh, vw) gives, in
    that part, what the model gives for the part alone: forward pre-hooks zero the inputs of zero-padded
    convolutions outside it (what a conv sees past an image edge) and reflect the inputs of the window attention
    layers (and of convolutions with other padding) at its edge. Feature maps at k× the tile size (after an
    upsampler) use k× the valid size. Exact for SST; a model with other spatial operators sees mirrored pixels."""

    def __init__(self, model: nn.Module, valid: Sequence[Tuple[int, int]], tile_hw: Tuple[int, int]):
        self.model = model
        self.valid = torch.tensor([list(v) for v in valid], dtype=torch.long)  # (B, 2)
        self.tile_hw = tuple(int(t) for t in tile_hw)
        self._cache: dict = {}
        self._handles: list = []

    def __enter__(self) -> "_ValidRegion":
        from ..nn.attention import RIBWindowAttention  # (the model package imports nothing from here)
        for m in self.model.modules():
            if isinstance(m, nn.Conv2d) and (m.kernel_size != (1, 1) or m.padding != (0, 0)):
                hook = self._zero_outside if m.padding_mode == "zeros" else self._mirror_outside
            elif isinstance(m, RIBWindowAttention):
                hook = self._mirror_outside
            else:
                continue
            self._handles.append(m.register_forward_pre_hook(hook))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _extent(self, x: torch.Tensor) -> Optional[torch.Tensor]:
        """(B, 2) valid rows/cols of a map of x's size, or None when x is not a k× copy of the tile grid."""
        (H, W), (th, tw) = x.shape[-2:], self.tile_hw
        if x.dim() != 4 or x.shape[0] != len(self.valid) or H % th or W % tw:
            return None
        return self.valid * torch.tensor([H // th, W // tw])

    def _per_size(self, kind: str, x: torch.Tensor, build):
        """build(x, extent) for maps of x's size, cached per (kind, size, device); None when x is not tile-shaped."""
        key = (kind, tuple(x.shape[-2:]), x.device)
        if key not in self._cache:
            ext = self._extent(x)
            if ext is None:
                return None
            self._cache[key] = build(x, ext)
        return self._cache[key]

    @staticmethod
    def _outside_mask(x: torch.Tensor, ext: torch.Tensor) -> torch.Tensor:
        rows = torch.arange(x.shape[-2])[None, :] >= ext[:, :1]
        cols = torch.arange(x.shape[-1])[None, :] >= ext[:, 1:]
        return (rows[:, None, :, None] | cols[:, None, None, :]).to(x.device)

    @staticmethod
    def _mirror_indices(x: torch.Tensor, ext: torch.Tensor) -> tuple:
        H, W = x.shape[-2:]
        rows = torch.stack([_mirror_index(H, int(v)) for v in ext[:, 0]])
        cols = torch.stack([_mirror_index(W, int(v)) for v in ext[:, 1]])
        b = torch.arange(len(ext))
        return b[:, None, None].to(x.device), rows[:, :, None].to(x.device), cols[:, None, :].to(x.device)

    def _zero_outside(self, module: nn.Module, args: tuple):
        x = args[0]
        mask = self._per_size("zero", x, self._outside_mask)
        if mask is None:
            return None
        return (x.masked_fill(mask, 0),) + tuple(args[1:])  # masked_fill, not a product: NaN beyond stays out

    def _mirror_outside(self, module: nn.Module, args: tuple):
        x = args[0]
        idx = self._per_size("mirror", x, self._mirror_indices)
        if idx is None:
            return None
        # one gather on the channels-last view: the result is channels-last, the layout SST's activations use
        return (x.permute(0, 2, 3, 1)[idx].permute(0, 3, 1, 2),) + tuple(args[1:])


@dataclass(frozen=True)
class TilePlan:
    """How an h×w image is cut. ``tile`` None: one piece, the image at its own size. Otherwise every model input is
    ``tile × tile``; ``ys``/``xs`` are the (origin, valid size) of the tile rows/columns (see ``plan_axis``)."""

    height: int
    width: int
    tile: Optional[int]
    overlap: int
    ys: Tuple[Tuple[int, int], ...]
    xs: Tuple[Tuple[int, int], ...]

    @property
    def shape(self) -> Tuple[int, int]:
        """The (height, width) of every model input for this image."""
        return (self.height, self.width) if self.tile is None else (self.tile, self.tile)

    def __len__(self) -> int:
        return len(self.ys) * len(self.xs)

    @property
    def cost(self) -> int:
        """LR pixels the model processes."""
        return len(self) * self.shape[0] * self.shape[1]


def _ramp(n: int) -> torch.Tensor:
    """Rising weights over an overlap of n samples: ~0 over the outer quarter (pixels next to a tile edge see the
    least context), a sin² ramp over the middle half, ~1 over the inner quarter; ``_ramp(n) + _ramp(n).flip(0) == 1``
    up to the 1e-6 floor that keeps every weight positive."""
    dead = n // 4
    mid = n - 2 * dead
    r = torch.full((n,), 1e-6, dtype=torch.float64)
    if mid > 0:
        r[dead:dead + mid] = torch.sin((torch.arange(mid, dtype=torch.float64) + 0.5) * (math.pi / (2 * mid))) ** 2
    r[dead + mid:] = 1.0
    return r.clamp_(min=1e-6)


def axis_weights(tiles: Sequence[Tuple[int, int]], scale: int) -> List[torch.Tensor]:
    """Blend weights (length ``scale·size``, float32) of each tile along one axis: ramps (see ``_ramp``) over the
    parts it shares with its neighbours, 1 elsewhere; always positive, so every output pixel has a weight sum > 0."""
    out = []
    n = len(tiles)
    for i, (o, size) in enumerate(tiles):
        w = torch.ones(size * scale, dtype=torch.float64)
        if i > 0:
            left = (tiles[i - 1][0] + tiles[i - 1][1] - o) * scale
            if left > 0:
                w[:left] *= _ramp(left)
        if i < n - 1:
            right = (o + size - tiles[i + 1][0]) * scale
            if right > 0:
                w[size * scale - right:] *= _ramp(right).flip(0)
        out.append(w.float())
    return out


def resize_lanczos(planes: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
    """(C, H, W) float in [0, 1] -> (C, *size) float32 in [0, 1]: Pillow's Lanczos (a = 3, widened when shrinking,
    so it also antialiases) on each channel as a float32 'F' image, then clamped (Lanczos rings past the range).
    Real-ESRGAN resizes its ``--outscale`` with Lanczos too; float32 keeps 16-bit images at full depth."""
    from PIL import Image

    h, w = size
    out = [np.asarray(Image.fromarray(np.ascontiguousarray(p, dtype=np.float32))
                      .resize((w, h), Image.Resampling.LANCZOS)) for p in planes.float().numpy()]
    return torch.from_numpy(np.stack(out)).clamp_(0, 1)


def _axis_sum(tiles: Sequence[Tuple[int, int]], weights: Sequence[torch.Tensor], length: int, scale: int):
    s = torch.zeros(length * scale, dtype=torch.float32)
    for (o, size), w in zip(tiles, weights):
        s[o * scale:(o + size) * scale] += w
    return s


# the 8 symmetries of the square (rotations × flip) and their inverses, on (B, C, H, W)
def _dihedral(x: torch.Tensor, k: int) -> torch.Tensor:
    if k >= 4:
        x = x.flip(-1)
    return torch.rot90(x, k % 4, dims=(-2, -1))


def _dihedral_inv(x: torch.Tensor, k: int) -> torch.Tensor:
    x = torch.rot90(x, -(k % 4), dims=(-2, -1))
    return x.flip(-1) if k >= 4 else x


@dataclass
class UpscaleStats:
    tiles: int = 0  # tiles (model inputs) run, including retries
    forwards: int = 0  # model calls
    oom_retries: int = 0  # out-of-memory errors recovered from
    fp32_redos: int = 0  # tiles redone in fp32 after a non-finite low-precision output
    tile_sizes: List[int] = field(default_factory=list)  # tile size after each halving


class Upscaler:
    """Upscale images of any size with an SST (or any model mapping (B, 3, h, w) -> (B, 3, s·h, s·w)).

    Args:
        model: the network; ``model.config.upscaling_factor``/``window_sizes`` and ``model.min_input_size`` are read
            when present (else give ``scale``).
        device: where the model runs (default: where its parameters are).
        tile: LR tile size — an int (rounded up to a multiple of the alignment, to at least twice the overlap and
            to at least one alignment unit more than the model's minimum input), ``0``/None for the whole image in
            one piece, or ``"auto"``: at most what fits free device memory on CUDA (256 on CPU), chosen per image to
            waste the least work. All tiles of an image have this one shape; an image that fits in a tile runs whole.
        overlap: LR overlap between neighbouring tiles (rounded up to a multiple of the alignment); default the
            alignment, at least 32 (64 for the SST presets: their largest window).
        precision: ``auto | bf16 | fp16 | fp32`` (auto: bf16 on CUDA GPUs that have it, else fp32).
        tile_batch: tiles per forward (default 4 on CUDA, 1 on CPU).
        tta: 8-way self-ensemble (rotations and flips, averaged): 8× the work.
        alpha: ``"model"`` (alpha upscaled through the network as a grey image) or ``"bicubic"``.
        on_tile: called with the number of finished tiles after each batch (progress bars).
        max_memory_gib: with ``tile='auto'`` on CUDA, a cap on the memory the tiles are sized for.
        prepared: run a copy made by ``model.prepare_inference(dtype)`` in the chosen precision (None: on CUDA in
            bf16/fp16 when the model has that method and the extension's CUDA ops are built; True: also on CPU or in
            fp32; False: never, the model runs as given, under autocast in bf16/fp16).
    """

    def __init__(self, model: nn.Module, *, device: Union[str, torch.device, None] = None,
                 tile: Union[int, str, None] = "auto", overlap: Optional[int] = None, precision: str = "auto",
                 tile_batch: Optional[int] = None, tta: bool = False, alpha: str = "model",
                 scale: Optional[int] = None, on_tile: Optional[Callable[[int], None]] = None,
                 max_memory_gib: Optional[float] = None, prepared: Optional[bool] = None):
        if device is None:
            device = next(model.parameters()).device
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        cfg = getattr(model, "config", None)
        self.scale = int(scale if scale is not None else cfg.upscaling_factor)
        self.align = model_alignment(model)
        self.min_size = int(getattr(model, "min_input_size", 1))
        self.dtype = resolve_precision(precision, self.device)
        if isinstance(tile, str):
            if tile.lower() != "auto":
                tile = int(tile)
            else:
                tile = "auto"
        if tile != "auto":
            tile = int(tile or 0)
            if tile < 0:
                raise ValueError(f"tile must be >= 0 or 'auto', got {tile}")
        self.overlap = self._round_up(max(self.align, 32) if overlap is None else max(0, int(overlap)))
        # an edge tile's valid part is > tile − align: it must still be a legal model input
        self.min_tile = self._round_up(self.min_size) + self.align
        if tile != "auto" and tile:  # room for the overlap on both sides: never seams by request
            tile = max(self._round_up(tile), 2 * self.overlap, self.min_tile)
        self.tile = tile
        self.tile_batch = int(tile_batch) if tile_batch else (4 if self.device.type == "cuda" else 1)
        self.tta = bool(tta)
        if alpha not in ("model", "bicubic"):
            raise ValueError(f"alpha must be 'model' or 'bicubic', got {alpha!r}")
        self.alpha = alpha
        self.on_tile = on_tile
        self.max_memory_gib = max_memory_gib
        self.stats = UpscaleStats()
        if prepared and not callable(getattr(model, "prepare_inference", None)):
            raise ValueError(f"prepared=True needs a model with prepare_inference() (an SST), got "
                             f"{type(model).__name__}")
        self.prepared = _prepared_default(model, self.device, self.dtype) if prepared is None else bool(prepared)
        self._prepared_model: Optional[nn.Module] = None
        self._tile_cap: Optional[int] = None  # lowered after an out-of-memory error

    # ----------------------------------------------------------------------------------------- tile geometry
    def _round_up(self, n: int) -> int:
        return -(-int(n) // self.align) * self.align

    def auto_tile(self) -> int:
        """Tile size for ``tile='auto'``: on CUDA the largest multiple of the alignment whose estimated activation
        memory (for ``tile_batch`` tiles) fits half the free device memory; 256 on CPU (bounded host memory, and
        faster there than large tiles: 960×540 ×4 took 360 s with 256-pixel tiles, 951 s with 576). Each image then
        uses the multiple of the alignment up to this size that wastes the least work."""
        if self.device.type != "cuda":
            return max(self._round_up(256), 2 * self.overlap, self.min_tile)
        free, _total = torch.cuda.mem_get_info(self.device)
        budget = 0.5 * free
        if self.max_memory_gib:
            budget = min(budget, self.max_memory_gib * 2**30)
        cfg = getattr(self.model, "config", None)
        dim = int(getattr(cfg, "dim", 64))
        nf = int(getattr(cfg, "intermediate_dim", None) or dim)
        elem = 4 if self.dtype == torch.float32 else 2
        s2 = self.scale ** 2
        # a rough per-LR-pixel footprint: the transformer's activations (~20·dim values) and the upsampler's
        # pre-shuffle features (nf·s²), its output and the float32 result (≈ 8·s²)
        per_px = elem * (20 * dim + 2 * nf * s2) + 16 * s2
        px = budget / (per_px * max(1, self.tile_batch))
        t = int(math.sqrt(max(px, 1))) // self.align * self.align
        return max(self.min_tile, min(t, self._round_up(2048)))

    def tile_size(self) -> Optional[int]:
        """The tile size now in use (None: whole images)."""
        t = self.auto_tile() if self.tile == "auto" else (self.tile or None)
        if self._tile_cap is not None:
            t = self._tile_cap if t is None else min(t, self._tile_cap)
        return t

    def _overlap_for(self, t: int) -> int:
        ov = self.overlap
        if 2 * ov > t:
            ov = (t // 2) // self.align * self.align
        return ov

    def _best_auto(self, h: int, w: int, limit: int) -> int:
        """For tile='auto': the multiple of the alignment up to ``limit`` whose tiles process the fewest pixels on an
        h×w image (tiles × tile², overlaps and the unused part of edge tiles included); the larger one on a tie."""
        best, best_cost = limit, None
        for t in range(limit, max(self.min_tile, 2 * self.overlap) - 1, -self.align):  # keep the full overlap
            cost = self._plan_for(h, w, t).cost
            if best_cost is None or cost < best_cost * 0.999:
                best, best_cost = t, cost
        return best

    def _plan_for(self, h: int, w: int, t: Optional[int]) -> TilePlan:
        if t is None or (t >= h and t >= w):
            return TilePlan(h, w, None, 0, ((0, h),), ((0, w),))
        ov = self._overlap_for(t)
        return TilePlan(h, w, t, ov, tuple(plan_axis(h, t, ov, self.align)), tuple(plan_axis(w, t, ov, self.align)))

    def plan(self, h: int, w: int) -> TilePlan:
        """How an h×w image is cut now (after any out-of-memory halving): one tile shape for all its tiles."""
        t = self.tile_size()
        if self.tile == "auto" and t is not None and (t < h or t < w):
            t = self._best_auto(h, w, t)
        return self._plan_for(h, w, t)

    def tile_dims(self, h: int, w: int) -> Tuple[int, int, int]:
        """(tile height, tile width, overlap) used for an h×w image now (the image size when it runs whole)."""
        p = self.plan(h, w)
        return (*p.shape, p.overlap)

    def count_tiles(self, h: int, w: int) -> int:
        """Tiles (model inputs before any retry) for one h×w plane."""
        return len(self.plan(max(h, self.min_size), max(w, self.min_size)))  # as padded by upscale()

    def tiles_for(self, shape_hwc: Tuple[int, ...]) -> int:
        """Tiles :meth:`upscale_array` will run for an (H, W, C) image (alpha through the model counts twice)."""
        h, w = shape_hwc[:2]
        c = shape_hwc[2] if len(shape_hwc) > 2 else 1
        n = self.count_tiles(h, w)
        return 2 * n if c in (2, 4) and self.alpha == "model" else n

    # ----------------------------------------------------------------------------------------- the network
    def _free(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def runner(self, dtype: torch.dtype) -> nn.Module:
        """The module that runs tiles in ``dtype``: the prepared copy for the chosen precision (made on first use),
        else the model as given (float32, or under autocast)."""
        if not self.prepared or dtype != self.dtype:
            return self.model
        if self._prepared_model is None:
            self._prepared_model = copy.deepcopy(self.model).prepare_inference(dtype)
        return self._prepared_model

    def _net(self, x: torch.Tensor, dtype: torch.dtype, valid: Optional[Sequence[Tuple[int, int]]]) -> torch.Tensor:
        self.stats.forwards += 1
        partial = valid is not None and any(tuple(v) != tuple(x.shape[-2:]) for v in valid)
        model = self.runner(dtype)
        with _ValidRegion(model, valid, x.shape[-2:]) if partial else nullcontext():
            if dtype == torch.float32 or model is not self.model:  # (a prepared model casts the image itself)
                out = model(x).float()
            else:
                with torch.autocast(device_type=self.device.type, dtype=dtype):
                    out = self.model(x).float()
        if partial:  # what lies beyond the valid parts is never used; zeroed, it cannot trip the NaN check
            s = self.scale
            rows = torch.arange(out.shape[-2], device=out.device)[None, :]
            cols = torch.arange(out.shape[-1], device=out.device)[None, :]
            v = torch.tensor([list(t) for t in valid], device=out.device) * s
            out.masked_fill_((rows >= v[:, :1])[:, None, :, None] | (cols >= v[:, 1:])[:, None, None, :], 0)
        return out

    def _net_checked(self, x: torch.Tensor, valid: Optional[Sequence[Tuple[int, int]]] = None) -> torch.Tensor:
        """Model output for a device batch; samples with NaN/Inf in low precision are redone in fp32."""
        out = self._net(x, self.dtype, valid)
        if self.dtype != torch.float32:
            bad = ~torch.isfinite(out).flatten(1).all(1)
            if bool(bad.any()):
                idx = bad.nonzero().flatten()
                out[idx] = self._net(x[idx], torch.float32, None if valid is None else [valid[i] for i in idx.tolist()])
                self.stats.fp32_redos += int(idx.numel())
        return out

    def _net_tta(self, x: torch.Tensor, valid: Optional[Sequence[Tuple[int, int]]]) -> torch.Tensor:
        """The mean of the 8 symmetric predictions. Each sample's valid part is transformed on its own and put back
        top-left, so every prediction is that of the transformed part alone (as for a whole image)."""
        s = self.scale
        if valid is None or all(tuple(v) == tuple(x.shape[-2:]) for v in valid):
            out = None
            for k in range(8):
                y = _dihedral_inv(self._net_checked(_dihedral(x, k), valid), k).clamp_(0, 1)
                out = y if out is None else out.add_(y)
            return out.div_(8)
        t = x.shape[-1]  # tiles are square, so every transform fits the same shape
        out = torch.zeros(x.shape[0], 3, s * t, s * t, device=x.device)
        for k in range(8):
            parts = [_dihedral(xi[None, :, :vh, :vw], k)[0] for xi, (vh, vw) in zip(x, valid)]
            vk = [tuple(p.shape[-2:]) for p in parts]
            y = self._net_checked(torch.stack([_pad_tile(p, t) for p in parts]), vk)
            for i, ((vh, vw), (kh, kw)) in enumerate(zip(valid, vk)):
                out[i, :, :s * vh, :s * vw] += _dihedral_inv(y[i:i + 1, :, :s * kh, :s * kw], k)[0].clamp_(0, 1)
        return out.div_(8)

    @torch.inference_mode()
    def forward_tiles(self, x: torch.Tensor, valid: Optional[Sequence[Tuple[int, int]]] = None) -> torch.Tensor:
        """(B, 3, h, w) float host tiles -> (B, 3, s·h, s·w) float32 host outputs in [0, 1] (TTA, padding for
        inputs smaller than the model's minimum, NaN redo). ``valid``: per tile the (rows, cols) of its top-left
        part that hold pixels (see ``_ValidRegion``); the output is meaningful (and nonzero) only there.
        Out-of-memory errors propagate."""
        h, w = x.shape[-2:]
        ph, pw = max(0, self.min_size - h), max(0, self.min_size - w)
        if ph or pw:  # tiny images: pad to the model's minimum size, crop the output
            mode = "reflect" if ph < h and pw < w else "replicate"
            x = F.pad(x, (0, pw, 0, ph), mode=mode)
        xd = x.to(self.device, non_blocking=True)
        out = self._net_tta(xd, valid) if self.tta else self._net_checked(xd, valid)
        s = self.scale
        out = out[..., :s * h, :s * w].clamp_(0, 1)
        self.stats.tiles += x.shape[0] * (8 if self.tta else 1)
        return out.cpu()

    # ----------------------------------------------------------------------------------------- tiled plane
    @torch.inference_mode()
    def upscale(self, img: torch.Tensor) -> torch.Tensor:
        """(3, H, W) float in [0, 1] (host) -> (3, s·H, s·W) float32 host tensor in [0, 1]."""
        if img.dim() != 3 or img.shape[0] != 3:
            raise ValueError(f"expected an RGB image (3, H, W), got shape {tuple(img.shape)}")
        img = img.detach().float().cpu()
        h, w = img.shape[-2:]
        ph, pw = max(0, self.min_size - h), max(0, self.min_size - w)
        if ph or pw:  # smaller than the model's minimum: padded as forward_tiles pads a whole image
            mode = "reflect" if ph < h and pw < w else "replicate"
            img = F.pad(img[None], (0, pw, 0, ph), mode=mode)[0]
        out = self._region(img, top=True)
        return out[:, :self.scale * h, :self.scale * w] if ph or pw else out

    def _region(self, img: torch.Tensor, top: bool) -> torch.Tensor:
        _, h, w = img.shape
        s = self.scale
        plan = self.plan(h, w)
        if plan.tile is None:  # one piece at its own size: no blending buffers
            return self._one_tile(img, top)
        t, ys, xs = plan.tile, plan.ys, plan.xs
        wy, wx = axis_weights(ys, s), axis_weights(xs, s)
        out = torch.zeros(3, h * s, w * s, dtype=torch.float32)
        coords = [(i, j) for i in range(len(ys)) for j in range(len(xs))]
        k = 0
        while k < len(coords):
            batch = coords[k:k + self.tile_batch]
            crops = [img[:, ys[i][0]:ys[i][0] + ys[i][1], xs[j][0]:xs[j][0] + xs[j][1]] for i, j in batch]
            if self._tile_cap is not None and t > self._tile_cap:  # planned before a halving
                res = [self._region(c, top=False) for c in crops]
            else:
                try:
                    res = self.forward_tiles(torch.stack([_pad_tile(c, t) for c in crops]),
                                             [tuple(c.shape[-2:]) for c in crops])
                except Exception as e:
                    if not is_oom(e):
                        raise
                    del e
                    self._free()
                    self.stats.oom_retries += 1
                    if len(batch) > 1:  # first fewer tiles per forward, then smaller tiles
                        self.tile_batch = max(1, len(batch) // 2)
                        continue
                    self._halve(t)
                    res = [self._region(crops[0], top=False)]  # the same tile, in smaller tiles
            for (i, j), r in zip(batch, res):
                (y0, vh), (x0, vw) = ys[i], xs[j]
                out[:, y0 * s:(y0 + vh) * s, x0 * s:(x0 + vw) * s].addcmul_(
                    r[:, :vh * s, :vw * s], wy[i][:, None] * wx[j][None, :])
            k += len(batch)
            if top and self.on_tile is not None:
                self.on_tile(len(batch))
        out.div_(_axis_sum(ys, wy, h, s)[:, None]).div_(_axis_sum(xs, wx, w, s)[None, :])
        return out

    def _one_tile(self, img: torch.Tensor, top: bool) -> torch.Tensor:
        try:
            res = self.forward_tiles(img.unsqueeze(0))[0]
        except Exception as e:
            if not is_oom(e):
                raise
            del e
            self._free()
            self.stats.oom_retries += 1
            self._halve(max(img.shape[-2:]))
            res = self._region(img, top=False)
        if top and self.on_tile is not None:
            self.on_tile(1)
        return res

    def _halve(self, current: int) -> None:
        current = self._round_up(current)
        # half, down to a multiple of the alignment, but not below the smallest legal tile while above it
        new = max(current // 2 // self.align * self.align, self.min_tile)
        if new >= current:
            raise torch.OutOfMemoryError(f"out of memory even with {current}-pixel tiles (the smallest for this "
                                         f"model is {self.min_tile}): use --device cpu")
        self._tile_cap = new
        self.stats.tile_sizes.append(new)

    # ----------------------------------------------------------------------------------------- whole images
    @torch.inference_mode()
    def upscale_array(self, arr: np.ndarray, *, outscale: Optional[float] = None) -> np.ndarray:
        """(H, W, C) uint8/uint16 pixels, C = 1 grey, 2 grey+alpha, 3 RGB, 4 RGBA -> the same layout and dtype,
        ``scale``× larger (or ``outscale``× with a Lanczos resize after the network, see ``resize_lanczos``). Grey
        is upscaled as RGB and converted back (ITU-R 601 luma); alpha is upscaled separately (``alpha``) unless fully
        opaque."""
        if arr.ndim == 2:
            arr = arr[..., None]
        if arr.ndim != 3 or arr.shape[2] not in (1, 2, 3, 4) or arr.dtype not in (np.uint8, np.uint16):
            raise ValueError(f"expected (H, W, C) uint8/uint16 with C in 1..4, got {arr.shape} {arr.dtype}")
        peak = 65535.0 if arr.dtype == np.uint16 else 255.0
        h, w, c = arr.shape
        arr_c = np.ascontiguousarray(arr)
        planes = torch.from_numpy(arr_c if arr_c.flags.writeable else arr_c.copy()).permute(2, 0, 1)
        color = planes[:3] if c >= 3 else planes[:1].expand(3, h, w)
        out = self.upscale(color.float().div_(peak))
        if c <= 2:
            out = sum(k * out[i] for i, k in enumerate(_LUMA)).unsqueeze(0)
        chans = [out]
        if c in (2, 4):
            a = planes[-1:]
            if int(arr[..., -1].min()) == int(peak):  # fully opaque: nothing to upscale
                chans.append(torch.ones(1, h * self.scale, w * self.scale))
                if self.alpha == "model" and self.on_tile is not None:
                    self.on_tile(self.count_tiles(h, w))
            elif self.alpha == "model":
                chans.append(self.upscale(a.float().div_(peak).expand(3, h, w)).mean(0, keepdim=True))
            else:
                up = F.interpolate(a.float().div_(peak)[None], scale_factor=self.scale, mode="bicubic",
                                   align_corners=False)
                chans.append(up[0].clamp_(0, 1))
        res = torch.cat(chans) if len(chans) > 1 else chans[0]
        del chans, out
        if outscale is not None and abs(outscale - self.scale) > 1e-9:
            res = resize_lanczos(res, (max(1, round(h * outscale)), max(1, round(w * outscale))))
        res = res.mul_(peak).round_().permute(1, 2, 0)
        return res.numpy().astype(arr.dtype)
