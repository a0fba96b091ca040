"""Upscaling images and videos with a trained SST.

``examples/upscale.py`` (and ``python -m rfsr_cuda.upscale``) is the command-line face of this package:

* :class:`Upscaler` — tiled inference with blended overlaps (one tile shape per image, several tiles per forward),
  the image kept in host memory, automatic tile size, out-of-memory retry with halved tiles, bf16/fp16/fp32 with an
  fp32 redo of non-finite tiles, TTA, alpha, a Lanczos resize for a non-integer final scale;
* :func:`upscale_image_file` / :func:`upscale_video` — one file in, one file out, keeping bit depth, grey, alpha,
  EXIF and ICC profile (images) or frame rate and audio (videos), written atomically;
* :func:`collect_inputs` / :func:`output_path_for` — files, folders (recursive) and globs, and output names.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Union

import torch
from torch import nn

from ..image_io import ImageInfo, ImageReadError, load_image, read_image, save_png, write_image
from .files import (OUTPUT_EXTENSIONS, VIDEO_EXTENSIONS, InputFile, collect_inputs, default_output_dir,
                    is_video_file, list_inputs, output_extension, output_path_for, same_file)
from .model import (DEFAULT_PRESET, bundled_weights_name, find_bundled_weights, load_model, model_scale,
                    resolve_device)
from .tiling import (PRECISIONS, TilePlan, Upscaler, UpscaleStats, axis_weights, is_oom, model_alignment,
                     plan_axis, resize_lanczos, resolve_precision)
from .video import VideoError, probe_video, upscale_video

__all__ = [
    "DEFAULT_PRESET", "ImageInfo", "ImageReadError", "VideoError", "Upscaler", "UpscaleStats", "TilePlan",
    "PRECISIONS",
    "OUTPUT_EXTENSIONS", "VIDEO_EXTENSIONS", "InputFile",
    "bundled_weights_name", "find_bundled_weights", "load_model", "model_scale", "resolve_device",
    "load_image", "read_image", "write_image", "save_png",
    "upscale_tensor", "upscale_file", "upscale_image_file", "upscale_video", "probe_video",
    "collect_inputs", "list_inputs", "is_video_file", "output_path_for", "output_extension", "default_output_dir",
    "same_file", "plan_axis", "axis_weights", "model_alignment", "resolve_precision", "resize_lanczos", "is_oom",
]

PathLike = Union[str, os.PathLike]


def upscale_tensor(model: nn.Module, img: torch.Tensor, *, amp: bool = True, tile: Union[int, str, None] = 0,
                   **kwargs) -> torch.Tensor:
    """Run ``model`` on one image (3, H, W) in [0, 1]; returns (3, s·H, s·W) float32 on the CPU, clamped to [0, 1].

    Whole image by default (``tile=0``); any :class:`Upscaler` keyword (tile, overlap, precision, tta, …) may be
    given. ``amp=False`` forces fp32; otherwise ``precision`` defaults to auto (bf16 on CUDA, fp32 on CPU).
    """
    if not amp:
        kwargs["precision"] = "fp32"
    return Upscaler(model, tile=tile, **kwargs).upscale(img)


def upscale_image_file(upscaler: Upscaler, src: PathLike, dst: PathLike, *, outscale: Optional[float] = None,
                       quality: int = 95, keep_metadata: bool = True, max_pixels: Optional[int] = None,
                       info: Optional[ImageInfo] = None, pixels=None) -> ImageInfo:
    """Read ``src``, upscale it, write ``dst`` (format from its extension) atomically, keeping bit depth (as far as
    the format allows), grey, alpha, EXIF and ICC profile. Raises :class:`ImageReadError` for an unreadable input.
    Returns what the input held. ``pixels``/``info`` may pass an already-read image."""
    if pixels is None:
        kw = {} if max_pixels is None else {"max_pixels": max_pixels}
        pixels, info = read_image(src, **kw)
    out = upscaler.upscale_array(pixels, outscale=outscale)
    del pixels
    Path(dst).parent.mkdir(parents=True, exist_ok=True)
    write_image(out, dst, quality=quality, exif=info.exif if keep_metadata else None,
                icc_profile=info.icc_profile if keep_metadata else None)
    return info


def upscale_file(model: nn.Module, src: PathLike, dst: PathLike, *, amp: bool = True, **kwargs) -> ImageInfo:
    """One-call form of :func:`upscale_image_file` with a model (``Upscaler`` keywords accepted)."""
    if not amp:
        kwargs["precision"] = "fp32"
    return upscale_image_file(Upscaler(model, **kwargs), src, dst)
