"""MATLAB-compatible ``imresize`` with the bicubic kernel, the resampler behind the standard SR "BI" degradation.

Super-resolution benchmarks make their low-resolution inputs with MATLAB's ``imresize(HR, 1/s, 'bicubic')``. Other
bicubic resamplers (PIL, OpenCV, ``F.interpolate`` without padding) differ at the borders or everywhere, which moves
PSNR by tenths of a dB, so evaluation and on-the-fly training pairs use this module.

The algorithm, per spatial dimension of length ``n_in`` resized to ``n_out`` by the factor ``s = n_out / n_in``:

* kernel: Keys' cubic with ``a = -0.5``,
  ``k(x) = 1.5|x|³ - 2.5|x|² + 1`` for ``|x| <= 1``, ``-0.5|x|³ + 2.5|x|² - 4|x| + 2`` for ``1 < |x| <= 2``, else 0;
* when shrinking (``s < 1``) with antialiasing the kernel is stretched: ``h(x) = s·k(s·x)``, support ``4/s`` pixels;
* output pixel ``i`` (1-based) sits at input coordinate ``u = i/s + (1 - 1/s)/2``; its taps are the
  ``ceil(width) + 2`` input pixels starting at ``floor(u - width/2)``, weighted by ``h(u - j)`` and normalised to sum 1;
* taps that fall outside the image are mirrored with edge repetition (``..., 2, 1 | 1, 2, ..., n | n, n-1, ...``);
* the dimension with the smaller factor is resized first (rows first on a tie), as MATLAB does.

Floating-point images are not clipped (bicubic overshoots slightly); integer images come back in their own dtype,
rounded and saturated, as MATLAB returns them.
"""
from __future__ import annotations

import math
from typing import Sequence, Tuple, Union

import numpy as np
import torch

__all__ = ["imresize", "bicubic_downsample", "modcrop", "resize_weights", "cubic_kernel"]

ArrayLike = Union[torch.Tensor, np.ndarray]


def cubic_kernel(x: np.ndarray) -> np.ndarray:
    """Keys' cubic convolution kernel with ``a = -0.5`` (MATLAB's ``cubic``), evaluated elementwise in float64."""
    ax = np.abs(np.asarray(x, dtype=np.float64))
    ax2 = ax * ax
    ax3 = ax2 * ax
    near = (1.5 * ax3 - 2.5 * ax2 + 1.0) * (ax <= 1.0)
    far = (-0.5 * ax3 + 2.5 * ax2 - 4.0 * ax + 2.0) * ((ax > 1.0) & (ax <= 2.0))
    return near + far


def resize_weights(
    in_length: int, out_length: int, scale: float, antialiasing: bool = True
) -> Tuple[np.ndarray, np.ndarray]:
    """Taps of a 1-D bicubic resize, as MATLAB's ``contributions`` computes them.

    Returns ``(weights, indices)``, both of shape ``(out_length, taps)``: output ``i`` is
    ``sum_k weights[i, k] * input[indices[i, k]]`` with 0-based, already mirrored ``indices``. Columns whose weight is
    zero for every output are dropped.
    """
    if in_length < 1 or out_length < 1:
        raise ValueError(f"lengths must be positive, got in={in_length}, out={out_length}")
    if not scale > 0:
        raise ValueError(f"scale must be positive, got {scale}")
    width = 4.0
    if scale < 1 and antialiasing:
        width = width / scale

        def kernel(d):
            return scale * cubic_kernel(scale * d)
    else:
        kernel = cubic_kernel

    x = np.arange(1, out_length + 1, dtype=np.float64)
    u = x / scale + 0.5 * (1.0 - 1.0 / scale)
    left = np.floor(u - width / 2.0)
    taps = int(math.ceil(width)) + 2
    idx = left[:, None] + np.arange(taps, dtype=np.float64)[None, :]  # 1-based, may leave [1, in_length]
    weights = kernel(u[:, None] - idx)
    weights = weights / weights.sum(axis=1, keepdims=True)

    # symmetric extension with the edge pixel repeated: 0 -> 1, -1 -> 2, n+1 -> n, ...
    mirror = np.concatenate([np.arange(in_length), np.arange(in_length - 1, -1, -1)])
    idx = mirror[np.mod(idx.astype(np.int64) - 1, 2 * in_length)]

    used = np.any(weights != 0, axis=0)
    return weights[:, used], idx[:, used]


def _resize_dim_torch(x: torch.Tensor, dim: int, weights: np.ndarray, idx: np.ndarray) -> torch.Tensor:
    w = torch.as_tensor(weights, dtype=x.dtype, device=x.device)
    ind = torch.as_tensor(idx, dtype=torch.long, device=x.device)
    shape = [1] * x.dim()
    shape[dim] = w.shape[0]
    out = None
    for k in range(w.shape[1]):  # accumulate tap by tap, in MATLAB's order
        term = x.index_select(dim, ind[:, k]) * w[:, k].reshape(shape)
        out = term if out is None else out + term
    return out


def _resize_dim_numpy(x: np.ndarray, axis: int, weights: np.ndarray, idx: np.ndarray) -> np.ndarray:
    shape = [1] * x.ndim
    shape[axis] = weights.shape[0]
    out = None
    for k in range(weights.shape[1]):
        term = np.take(x, idx[:, k], axis=axis) * weights[:, k].reshape(shape)
        out = term if out is None else out + term
    return out


def _pair(v) -> Tuple:
    if isinstance(v, (tuple, list)):
        if len(v) != 2:
            raise ValueError(f"expected one value or two (height, width), got {v!r}")
        return tuple(v)
    return (v, v)


def _plan(in_hw, scale, output_size):
    """Per-dimension (out_length, factor) from a scale and/or an output size (MATLAB: size = ceil(scale * input))."""
    if scale is None and output_size is None:
        raise ValueError("give a scale or an output_size")
    plan = []
    scales = _pair(scale) if scale is not None else (None, None)
    sizes = _pair(output_size) if output_size is not None else (None, None)
    for n_in, s, n_out in zip(in_hw, scales, sizes):
        if n_out is None:
            s = float(s)
            n_out = int(math.ceil(s * n_in))
        elif s is None:
            n_out = int(n_out)
            s = n_out / n_in
        else:
            s, n_out = float(s), int(n_out)
        if n_out < 1 or not s > 0:
            raise ValueError(f"cannot resize length {n_in} by {s} to {n_out}")
        plan.append((n_out, s))
    return plan


def imresize(
    img: ArrayLike,
    scale: Union[float, Sequence[float], None] = None,
    *,
    output_size: Union[int, Sequence[int], None] = None,
    antialiasing: bool = True,
    compute_dtype: Union[torch.dtype, None] = None,
) -> ArrayLike:
    """Resize like MATLAB ``imresize(img, scale, 'bicubic')``.

    img: a torch tensor whose last two dimensions are (H, W) — e.g. (C, H, W) or (B, C, H, W) — or a numpy array
    whose first two dimensions are (H, W) — (H, W) or (H, W, C). Float images keep their dtype and are not clipped;
    integer images (uint8, uint16, ...) are computed in float64 and returned rounded and saturated in their dtype.
    scale: output/input factor (one number or (height, width)); output_size: (height, width) or one number. With
    only a scale the size is ``ceil(scale * input)``; with only a size the factor is ``size / input``; with both,
    both are used as given. compute_dtype (torch only): float64 by default on the CPU and for float64 inputs,
    float32 on other devices.
    """
    if isinstance(img, torch.Tensor):
        if img.dim() < 2:
            raise ValueError(f"expected a tensor (..., H, W), got shape {tuple(img.shape)}")
        dims = (img.dim() - 2, img.dim() - 1)
        in_dtype = img.dtype
        if compute_dtype is None:
            wide = img.device.type == "cpu" or in_dtype == torch.float64 or not in_dtype.is_floating_point
            compute_dtype = torch.float64 if wide else torch.float32
        x = img.to(compute_dtype)
    elif isinstance(img, np.ndarray):
        if img.ndim < 2:
            raise ValueError(f"expected an array (H, W[, C]), got shape {img.shape}")
        dims = (0, 1)
        in_dtype = img.dtype
        if in_dtype == np.bool_ or not (np.issubdtype(in_dtype, np.floating) or np.issubdtype(in_dtype, np.integer)):
            raise TypeError(f"unsupported array dtype {in_dtype}")
        x = img.astype(np.float64)
    else:
        raise TypeError(f"expected a torch.Tensor or numpy.ndarray, got {type(img).__name__}")

    in_hw = (img.shape[dims[0]], img.shape[dims[1]])
    plan = _plan(in_hw, scale, output_size)
    order = sorted(range(2), key=lambda d: plan[d][1])  # smaller factor first; stable, so rows first on a tie
    for d in order:
        n_out, s = plan[d]
        weights, idx = resize_weights(in_hw[d], n_out, s, antialiasing)
        if isinstance(x, torch.Tensor):
            x = _resize_dim_torch(x, dims[d], weights, idx)
        else:
            x = _resize_dim_numpy(x, dims[d], weights, idx)

    if isinstance(x, torch.Tensor):
        if in_dtype.is_floating_point:
            return x.to(in_dtype)
        info = torch.iinfo(in_dtype)
        return x.round().clamp_(info.min, info.max).to(in_dtype)
    if np.issubdtype(in_dtype, np.floating):
        return x.astype(in_dtype, copy=False)
    info = np.iinfo(in_dtype)
    return np.clip(np.round(x), info.min, info.max).astype(in_dtype)


def bicubic_downsample(img: ArrayLike, scale: int, **kwargs) -> ArrayLike:
    """The SR "BI" degradation: ``imresize(img, 1/scale)`` with antialiasing; output size ``ceil(H/scale)``.

    Mod-crop the HR image first (:func:`modcrop`) so that HR is exactly ``scale`` times the LR image.
    """
    scale = int(scale)
    if scale < 1:
        raise ValueError(f"scale must be a positive integer, got {scale}")
    if isinstance(img, torch.Tensor):
        h, w = img.shape[-2:]
    else:
        h, w = img.shape[:2]
    out = (-(-h // scale), -(-w // scale))
    return imresize(img, 1.0 / scale, output_size=out, **kwargs)


def modcrop(img: ArrayLike, scale: int) -> ArrayLike:
    """Crop the bottom/right so that height and width are multiples of ``scale`` (torch: last two dims; numpy: first two)."""
    scale = int(scale)
    if isinstance(img, torch.Tensor):
        h, w = img.shape[-2:]
        return img[..., : h - h % scale, : w - w % scale]
    h, w = img.shape[:2]
    return img[: h - h % scale, : w - w % scale, ...]
