"""PSNR and SSIM as super-resolution papers report them.

The protocol (the one BasicSR-based papers, SST included, use for their tables):

1. both images are turned into 8-bit: float images in [0, 1] are clamped, multiplied by 255 and rounded (in float32,
   half to even), uint8 images are taken as they are;
2. ``crop_border`` pixels are removed on every side (``crop_border = scale`` for SR);
3. with ``test_y_channel`` (the default) RGB is reduced to the luma of ITU-R BT.601 "studio swing", as MATLAB's
   ``rgb2ycbcr`` computes it: ``Y = 16 + 65.481 R + 128.553 G + 24.966 B`` for R, G, B in [0, 1], a float in
   [16, 235] that is **not** rounded; single-channel images are used as they are;
4. all further arithmetic is float64.

PSNR is ``10 log10(255² / MSE)`` over the cropped image (``inf`` for identical images). SSIM is Wang et al.'s index
with an 11×11 Gaussian window (σ = 1.5, normalised), 'valid' filtering only (no padding, no down-sampling),
``C1 = (0.01·255)²`` and ``C2 = (0.03·255)²``; the score is the mean of the SSIM map, averaged over channels when
``test_y_channel`` is off. A benchmark number is the mean of the per-image values.

Images are torch tensors (C, H, W) or (1, C, H, W), or numpy arrays (H, W, C) or (H, W), channels in RGB order.
"""
from __future__ import annotations

from typing import Dict, Union

import numpy as np
import torch

__all__ = [
    "to_uint8_image",
    "rgb_to_y",
    "calculate_psnr",
    "calculate_ssim",
    "evaluate_image",
    "gaussian_window",
]

ArrayLike = Union[torch.Tensor, np.ndarray]

# BT.601 studio-swing luma for RGB in [0, 1], on the 0-255 scale (MATLAB rgb2ycbcr, first row)
_Y_COEFFS = (65.481, 128.553, 24.966)
_Y_OFFSET = 16.0


def to_uint8_image(img: ArrayLike) -> np.ndarray:
    """An (H, W, C) uint8 numpy array from a float image in [0, 1] (tensor or array) or a uint8 image.

    Float images are clamped to [0, 1], scaled by 255 in float32 and rounded half to even.
    """
    if isinstance(img, torch.Tensor):
        t = img.detach()
        if t.dim() == 4:
            if t.shape[0] != 1:
                raise ValueError(f"expected one image, got a batch of {t.shape[0]}")
            t = t[0]
        if t.dim() == 2:
            t = t.unsqueeze(0)
        if t.dim() != 3:
            raise ValueError(f"expected a tensor (C, H, W) or (1, C, H, W), got shape {tuple(img.shape)}")
        if t.dtype in (torch.bfloat16, torch.float16):
            t = t.float()
        arr = t.cpu().permute(1, 2, 0).numpy()
    elif isinstance(img, np.ndarray):
        arr = img[..., None] if img.ndim == 2 else img
        if arr.ndim != 3:
            raise ValueError(f"expected an array (H, W) or (H, W, C), got shape {img.shape}")
    else:
        raise TypeError(f"expected a torch.Tensor or numpy.ndarray, got {type(img).__name__}")

    if arr.dtype == np.uint8:
        return np.ascontiguousarray(arr)
    if not np.issubdtype(arr.dtype, np.floating):
        raise TypeError(f"expected a float image in [0, 1] or a uint8 image, got dtype {arr.dtype}")
    x = np.clip(arr.astype(np.float32), 0.0, 1.0) * np.float32(255.0)
    return np.round(x).astype(np.uint8)


def rgb_to_y(img: ArrayLike) -> ArrayLike:
    """BT.601 studio-swing luma ``16 + 65.481 R + 128.553 G + 24.966 B`` of RGB values in [0, 1].

    numpy (..., 3) -> (...) float64; torch (..., 3, H, W) -> (..., 1, H, W) in the input's float dtype.
    The result is on the 0-255 scale (in [16, 235] for inputs in [0, 1]) and is not rounded.
    """
    r_c, g_c, b_c = _Y_COEFFS
    if isinstance(img, torch.Tensor):
        if img.dim() < 3 or img.shape[-3] != 3:
            raise ValueError(f"expected a tensor (..., 3, H, W), got shape {tuple(img.shape)}")
        x = img if img.dtype.is_floating_point else img.double()
        r, g, b = x[..., 0:1, :, :], x[..., 1:2, :, :], x[..., 2:3, :, :]
        return r_c * r + g_c * g + b_c * b + _Y_OFFSET
    x = np.asarray(img, dtype=np.float64)
    if x.shape[-1] != 3:
        raise ValueError(f"expected an array (..., 3), got shape {x.shape}")
    return r_c * x[..., 0] + g_c * x[..., 1] + b_c * x[..., 2] + _Y_OFFSET


def _prepare(img1: ArrayLike, img2: ArrayLike, crop_border: int, test_y_channel: bool) -> tuple:
    a, b = to_uint8_image(img1), to_uint8_image(img2)
    if a.shape != b.shape:
        raise ValueError(f"image shapes differ: {a.shape} vs {b.shape}")
    crop_border = int(crop_border)
    if crop_border < 0:
        raise ValueError(f"crop_border must be >= 0, got {crop_border}")
    if crop_border:
        a = a[crop_border:-crop_border, crop_border:-crop_border]
        b = b[crop_border:-crop_border, crop_border:-crop_border]
    if a.size == 0:
        raise ValueError(f"nothing left after cropping {crop_border} px from an image of shape {img1.shape}")

    def plane(x: np.ndarray) -> np.ndarray:
        x = x.astype(np.float64)
        if test_y_channel and x.shape[2] == 3:
            return rgb_to_y(x / 255.0)[..., None]
        return x

    return plane(a), plane(b)


def calculate_psnr(img1: ArrayLike, img2: ArrayLike, crop_border: int, test_y_channel: bool = True) -> float:
    """PSNR in dB between two images (see the module docstring for the protocol); ``inf`` when they are equal."""
    a, b = _prepare(img1, img2, crop_border, test_y_channel)
    mse = np.mean((a - b) ** 2)
    if mse == 0:
        return float("inf")
    return float(10.0 * np.log10(255.0 * 255.0 / mse))


def gaussian_window(size: int = 11, sigma: float = 1.5) -> np.ndarray:
    """The normalised 1-D Gaussian ``exp(-(i - c)² / (2σ²)) / sum`` (float64); the 2-D window is its outer product."""
    i = np.arange(size, dtype=np.float64) - (size - 1) / 2.0
    g = np.exp(-(i * i) / (2.0 * sigma * sigma))
    return g / g.sum()


def _filter_valid(x: np.ndarray, g: np.ndarray) -> np.ndarray:
    """Separable 'valid' correlation of a 2-D float64 array with ``outer(g, g)``."""
    n = g.shape[0]
    h, w = x.shape
    rows = sum(g[k] * x[k : h - n + 1 + k, :] for k in range(n))
    return sum(g[k] * rows[:, k : w - n + 1 + k] for k in range(n))


def _ssim_plane(x: np.ndarray, y: np.ndarray) -> float:
    c1 = (0.01 * 255.0) ** 2
    c2 = (0.03 * 255.0) ** 2
    g = gaussian_window(11, 1.5)
    if x.shape[0] < g.shape[0] or x.shape[1] < g.shape[0]:
        raise ValueError(f"SSIM needs at least {g.shape[0]}x{g.shape[0]} pixels after the crop, got {x.shape}")
    mu_x = _filter_valid(x, g)
    mu_y = _filter_valid(y, g)
    mu_xx, mu_yy, mu_xy = mu_x * mu_x, mu_y * mu_y, mu_x * mu_y
    var_x = _filter_valid(x * x, g) - mu_xx
    var_y = _filter_valid(y * y, g) - mu_yy
    cov = _filter_valid(x * y, g) - mu_xy
    ssim_map = ((2.0 * mu_xy + c1) * (2.0 * cov + c2)) / ((mu_xx + mu_yy + c1) * (var_x + var_y + c2))
    return float(ssim_map.mean())


def calculate_ssim(img1: ArrayLike, img2: ArrayLike, crop_border: int, test_y_channel: bool = True) -> float:
    """SSIM between two images (see the module docstring): mean of the map, averaged over channels."""
    a, b = _prepare(img1, img2, crop_border, test_y_channel)
    return float(np.mean([_ssim_plane(a[..., c], b[..., c]) for c in range(a.shape[2])]))


def _hw(img: ArrayLike) -> tuple:
    if isinstance(img, torch.Tensor):
        return tuple(img.shape[-2:])
    return tuple(img.shape[:2])


def evaluate_image(sr: ArrayLike, hr: ArrayLike, scale: int, test_y_channel: bool = True) -> Dict[str, float]:
    """``{'psnr': ..., 'ssim': ...}`` of an SR output against its HR image with ``crop_border = scale``.

    An HR image that is larger than ``sr`` by less than ``scale`` pixels per side (not mod-cropped) is cropped at the
    bottom/right to ``sr``'s size, as the benchmark data loaders do; any other size mismatch is an error.
    """
    (sh, sw), (hh, hw) = _hw(sr), _hw(hr)
    if (sh, sw) != (hh, hw):
        if 0 <= hh - sh < scale and 0 <= hw - sw < scale:
            hr = hr[..., :sh, :sw] if isinstance(hr, torch.Tensor) else hr[:sh, :sw, ...]
        else:
            raise ValueError(f"SR image is {sh}x{sw} but HR is {hh}x{hw} (scale {scale})")
    return {
        "psnr": calculate_psnr(sr, hr, crop_border=scale, test_y_channel=test_y_channel),
        "ssim": calculate_ssim(sr, hr, crop_border=scale, test_y_channel=test_y_channel),
    }
