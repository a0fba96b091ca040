"""``torch.ops.rfsr.window_partition`` / ``window_merge``: the data movement around window attention, one pass each.

``window_partition`` cuts the first C channels of pixel rows ``(B, H, W, G)`` into windows ``(B·nh·nw, wh·ww, C)``:
the map is reflect-padded at the bottom/right to whole windows (as ``F.pad(mode='reflect')``) and rolled by ``-shift``
(``torch.roll``), so position ``i`` of an axis holds padded pixel ``(i + shift) mod padded``.

``window_merge`` undoes such a partition (pad at the bottom/right to whole windows, cyclic shift by ``shift``, cut into windows):
pixel ``(y, x)`` takes the row of token ``(py % wh) * ww + px % ww`` of window ``(py // wh, px // ww)``, where
``(py, px) = ((y − sh) mod Hp, (x − sw) mod Wp)``; the padded positions are dropped. Optionally multiplied by
``sigmoid(gate)``, written into rows of ``out_width`` channels whose extra columns are zero (the padded layout SST's
inference path feeds its 1×1 GEMMs). The schemas and the CPU (ATen) and CUDA kernels live in csrc (window_ops.cpp,
window_ops_cuda.cpp, windows/); this module adds the fake kernels and the Python entry points. Inference only: no
autograd formula.
"""
from __future__ import annotations

from typing import Sequence

import torch

from . import flash_rfbias as _library  # noqa: F401  (loads rfsr_cuda._C, which registers the schemas)
from ._checks import require_float, require_tensors


def _pair(v, name: str) -> tuple[int, int]:
    if isinstance(v, int) and not isinstance(v, bool):
        v = (v, v)
    if not isinstance(v, Sequence) or len(v) != 2 or not all(isinstance(i, int) and not isinstance(i, bool)
                                                              for i in v):
        raise TypeError(f"{name} must be an int or two ints, got {v!r}")
    return int(v[0]), int(v[1])


def _geometry(height, width, window, shift) -> tuple[int, int]:
    """Mirrors check_geometry (csrc/window_ops.cpp); returns the window grid (nh, nw)."""
    if height < 1 or width < 1:
        raise ValueError(f"height and width must be >= 1, got {height} and {width}")
    (wh, ww), (sh, sw) = window, shift
    if wh < 1 or ww < 1:
        raise ValueError(f"window must be two sizes >= 1 (wh, ww), got {list(window)}")
    nh, nw = -(-height // wh), -(-width // ww)
    if not (0 <= sh < nh * wh and 0 <= sw < nw * ww):
        raise ValueError(f"shift must lie in [0, padded size) = [0, {nh * wh}) x [0, {nw * ww}), got {list(shift)}")
    return nh, nw


def _check_partition(x, window, shift, channels) -> int:
    """Mirrors check_window_partition_inputs (csrc/window_ops.cpp); returns the number of windows."""
    require_tensors((("x", x),), allow_none=False)
    require_float("x", x, 4, "(B, H, W, G) pixel rows")
    if x.shape[1] < 1 or x.shape[2] < 1:
        raise ValueError(f"x must have at least one pixel, got shape {list(x.shape)}")
    H, W = x.shape[1], x.shape[2]
    nh, nw = _geometry(H, W, window, shift)
    ph, pw = nh * window[0] - H, nw * window[1] - W
    if ph >= H or pw >= W:
        raise ValueError(f"x is {H} x {W}, too small for window {list(window)}: reflect padding to whole windows "
                         f"needs each side > its padding ({ph} x {pw})")
    if not 1 <= channels <= x.shape[3]:
        raise ValueError(f"channels must be in [1, {x.shape[3]}] (the first channels of each pixel row), got {channels}")
    return x.shape[0] * nh * nw


def _check(windows, height, width, window, shift, gate, out_width) -> int:
    """Mirrors check_window_merge_inputs (csrc/window_ops.cpp); returns the image count B."""
    require_tensors((("windows", windows), ("gate", gate)))
    require_float("windows", windows, 3, "(B * windows per image, tokens per window, C)")
    wh, ww = window
    nh, nw = _geometry(height, width, window, shift)
    if windows.shape[1] != wh * ww:
        raise ValueError(f"windows must have wh * ww = {wh * ww} tokens per window (dim 1), got shape "
                         f"{list(windows.shape)}")
    if windows.shape[0] % (nh * nw):
        raise ValueError(f"windows must hold B * {nh * nw} windows (a {nh} x {nw} grid per {height} x {width} image), "
                         f"got shape {list(windows.shape)}")
    B, C = windows.shape[0] // (nh * nw), windows.shape[2]
    if C < 1:
        raise ValueError(f"windows must have at least one channel, got shape {list(windows.shape)}")
    if out_width < C:
        raise ValueError(f"out_width must be >= the {C} channels (extra columns are zero), got {out_width}")
    if gate is not None:
        if gate.dim() != 4 or tuple(gate.shape[:3]) != (B, height, width) or gate.shape[3] < C:
            raise ValueError(f"gate must be (B, H, W, G) = ({B}, {height}, {width}, >= {C}) pixel rows, got shape "
                             f"{list(gate.shape)}")
        if gate.device != windows.device:
            raise ValueError(f"gate is on {gate.device} but windows is on {windows.device}")
        if gate.dtype != windows.dtype:
            raise TypeError(f"gate has dtype {gate.dtype} but windows has {windows.dtype}; they must match")
    return B


@torch.library.register_fake("rfsr::window_partition")
def _partition_fake(x, window, shift, channels):
    n = _check_partition(x, window, shift, channels)
    return x.new_empty((n, window[0] * window[1], channels))


@torch.library.register_fake("rfsr::window_merge")
def _fake(windows, height, width, window, shift, gate, out_width):
    B = _check(windows, height, width, window, shift, gate, out_width)
    return windows.new_empty((B, height, width, out_width))


def window_partition(x: torch.Tensor, window: int | tuple[int, int], shift: int | tuple[int, int] = 0,
                     channels: int | None = None) -> torch.Tensor:
    """Windows ``(B·nh·nw, wh·ww, channels)`` of pixel rows ``x`` ``(B, H, W, G)``: the first ``channels`` (default
    G) of each row, reflect-padded at the bottom/right to whole windows and rolled by ``-shift`` first (the layout of
    ``RIBWindowAttention``). Rows of x may be wider than ``channels`` (read in place). No autograd."""
    window, shift = _pair(window, "window"), _pair(shift, "shift")
    if channels is None:
        channels = x.shape[-1] if isinstance(x, torch.Tensor) and x.dim() else 0
    _check_partition(x, window, shift, int(channels))
    return torch.ops.rfsr.window_partition(x, list(window), list(shift), int(channels))


def window_merge(windows: torch.Tensor, size: tuple[int, int], window: int | tuple[int, int],
                 shift: int | tuple[int, int] = 0, gate: torch.Tensor | None = None,
                 out_width: int | None = None) -> torch.Tensor:
    """Pixel rows ``(B, H, W, out_width)`` from window rows ``windows`` ``(B·nh·nw, wh·ww, C)`` of an image of
    ``size = (H, W)`` that was padded at the bottom/right to whole windows and rolled by ``-shift`` before the
    partition (the layout of ``RIBWindowAttention``); times ``sigmoid(gate[..., :C])`` when ``gate`` (``(B, H, W, G)``
    pixel rows, G >= C) is given, rounded where ``sigmoid(gate) * merged`` rounds. Columns ``[C, out_width)`` are
    zero (``out_width`` defaults to C). No autograd."""
    height, width = _pair(tuple(size), "size")
    window, shift = _pair(window, "window"), _pair(shift, "shift")
    C = windows.shape[-1] if isinstance(windows, torch.Tensor) and windows.dim() else 0
    out_width = C if out_width is None else int(out_width)
    _check(windows, height, width, window, shift, gate, out_width)
    return torch.ops.rfsr.window_merge(windows, height, width, list(window), list(shift), gate, out_width)
