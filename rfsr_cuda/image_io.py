"""Reading and writing images for training and inference (Pillow), with atomic writes.

Images travel through the package as float32 tensors (C, H, W) in [0, 1], RGB. Reading applies the EXIF
orientation, keeps 16-bit greyscale precision (scaled by 1/65535) and reduces everything else to 8-bit RGB; alpha is
dropped for now (``ImageInfo.has_alpha`` records it). Writing makes an 8-bit PNG through a temporary file in the
destination folder and ``os.replace``, so a reader never sees a half-written file.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Tuple, Union

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

__all__ = [
    "IMAGE_EXTENSIONS",
    "ImageReadError",
    "ImageInfo",
    "is_image_file",
    "read_rgb",
    "load_image",
    "save_png",
    "atomic_write",
]

PathLike = Union[str, os.PathLike]

# extensions looked for when a folder is scanned for training/validation images
IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".tga"})


class ImageReadError(Exception):
    """A file that could not be read as an image; the message is one line, without the path."""


@dataclass(frozen=True)
class ImageInfo:
    mode: str  # Pillow mode of the file ("RGB", "RGBA", "L", "I;16", "P", ...)
    bits: int  # 8 or 16
    grayscale: bool
    has_alpha: bool


def is_image_file(path: PathLike) -> bool:
    return Path(path).suffix.lower() in IMAGE_EXTENSIONS


def _open(path: PathLike) -> Image.Image:
    try:
        im = Image.open(path)
        im.load()  # decode now, so truncated/corrupt data fails here
    except UnidentifiedImageError:
        raise ImageReadError("not an image, or a format Pillow cannot read") from None
    except Image.DecompressionBombError as e:
        raise ImageReadError(f"too large to decode safely ({e})") from None
    except FileNotFoundError:
        raise ImageReadError("no such file") from None
    except IsADirectoryError:
        raise ImageReadError("is a folder") from None
    except (OSError, ValueError, SyntaxError, EOFError) as e:
        raise ImageReadError(f"cannot decode image: {e}") from None
    try:
        return ImageOps.exif_transpose(im)
    except Exception:  # a broken EXIF block should not lose the picture
        return im


def read_rgb(path: PathLike) -> Tuple[np.ndarray, ImageInfo]:
    """An (H, W, 3) RGB array, uint16 for 16-bit greyscale files and uint8 otherwise, and what the file held."""
    im = _open(path)
    mode = im.mode
    has_alpha = mode in ("RGBA", "LA", "PA", "La", "RGBa") or (mode == "P" and "transparency" in im.info)
    if mode.startswith("I;16") or mode == "I":
        arr = np.asarray(im)
        if arr.ndim != 2:
            raise ImageReadError(f"unsupported image layout {arr.shape} for mode {mode}")
        arr = np.clip(arr.astype(np.int64), 0, 65535).astype(np.uint16)
        return np.repeat(arr[..., None], 3, axis=2), ImageInfo(mode, 16, True, False)
    grayscale = mode in ("1", "L", "LA", "La") or (mode == "P" and _palette_is_gray(im))
    try:
        rgb = np.asarray(im.convert("RGB"))
    except (OSError, ValueError) as e:
        raise ImageReadError(f"cannot convert mode {mode} to RGB: {e}") from None
    return np.ascontiguousarray(rgb), ImageInfo(mode, 8, grayscale, has_alpha)


def _palette_is_gray(im: Image.Image) -> bool:
    pal = im.getpalette()
    if not pal:
        return False
    p = np.asarray(pal).reshape(-1, 3)
    return bool(np.all(p[:, 0] == p[:, 1]) and np.all(p[:, 1] == p[:, 2]))


def load_image(path: PathLike) -> Tuple[torch.Tensor, ImageInfo]:
    """A float32 (3, H, W) tensor in [0, 1] and the file's :class:`ImageInfo`; raises :class:`ImageReadError`."""
    rgb, info = read_rgb(path)
    peak = 65535.0 if rgb.dtype == np.uint16 else 255.0
    t = torch.from_numpy(rgb.astype(np.float32) / np.float32(peak)).permute(2, 0, 1).contiguous()
    return t, info


def atomic_write(path: PathLike, write) -> None:
    """Call ``write(tmp_path)`` on a temporary file beside ``path``, flush it to disk, then rename it to ``path``."""
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}{path.suffix}")  # keeps the extension
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def save_png(img: torch.Tensor, path: PathLike, *, grayscale: bool = False) -> None:
    """Write a float image (3, H, W) or (1, H, W) in [0, 1] as an 8-bit PNG, atomically.

    Values are clamped and rounded; ``grayscale`` stores an RGB image as one luma channel (Pillow's ITU-R 601 "L").
    """
    if img.dim() == 4 and img.shape[0] == 1:
        img = img[0]
    if img.dim() != 3 or img.shape[0] not in (1, 3):
        raise ValueError(f"expected an image (3, H, W) or (1, H, W), got shape {tuple(img.shape)}")
    arr = (img.detach().float().clamp(0, 1) * 255.0).round().to(torch.uint8).cpu().permute(1, 2, 0).numpy()
    pil = Image.fromarray(arr[..., 0], "L") if arr.shape[2] == 1 else Image.fromarray(arr, "RGB")
    if grayscale and pil.mode == "RGB":
        pil = pil.convert("L")
    atomic_write(path, lambda tmp: pil.save(tmp, format="PNG"))
