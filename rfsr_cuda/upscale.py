"""Upscaling images with a trained SST: model loading, one-image inference, and file/folder helpers.

``examples/upscale.py`` is the command-line face of this module. The model runs on the whole image at once
(tiling comes later) under ``torch.inference_mode``, in bf16 autocast on CUDA unless fp32 is asked for.
Outputs are 8-bit PNGs written atomically; grayscale inputs give grayscale outputs, alpha is dropped for now.
"""
from __future__ import annotations

import importlib.resources
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, List, Optional, Union

import torch
from torch import nn

from .image_io import ImageInfo, ImageReadError, load_image, save_png

__all__ = [
    "DEFAULT_PRESET",
    "ImageReadError",
    "bundled_weights_name",
    "find_bundled_weights",
    "load_model",
    "load_image",
    "save_png",
    "upscale_tensor",
    "upscale_file",
    "list_inputs",
    "output_path_for",
]

PathLike = Union[str, os.PathLike]
DEFAULT_PRESET = "sst_light"
# files that folder scans skip silently (OS metadata, never images)
_JUNK_NAMES = frozenset({"thumbs.db", "desktop.ini", ".ds_store"})


def bundled_weights_name(scale: int, preset: str = DEFAULT_PRESET) -> str:
    return f"{preset}_x{int(scale)}.safetensors"


def find_bundled_weights(scale: int, preset: str = DEFAULT_PRESET):
    """The packaged ``rfsr_cuda/weights/{preset}_x{scale}.safetensors`` as an importlib.resources Traversable, or
    None when this install ships none for that scale."""
    try:
        candidate = importlib.resources.files("rfsr_cuda") / "weights" / bundled_weights_name(scale, preset)
    except (ModuleNotFoundError, FileNotFoundError):
        return None
    return candidate if candidate.is_file() else None


@contextmanager
def _as_path(weights) -> Iterator[Path]:
    if isinstance(weights, (str, os.PathLike)):
        yield Path(weights)
    else:  # a Traversable from find_bundled_weights (maybe inside a zip)
        with importlib.resources.as_file(weights) as p:
            yield Path(p)


def load_model(weights, device: Union[str, torch.device] = "cpu", *, preset: Optional[str] = None) -> nn.Module:
    """Build and load an SST: an rfsr .safetensors file carries its config; an official .pth file needs the
    ``preset`` it was trained as (its window sizes are not recorded in the weights)."""
    from .models import model_from_checkpoint

    with _as_path(weights) as path:
        model = model_from_checkpoint(path, preset=preset) if preset else model_from_checkpoint(path)
    return model.to(device).eval()


def model_scale(model: nn.Module) -> int:
    return int(model.config.upscaling_factor)


@torch.inference_mode()
def upscale_tensor(model: nn.Module, img: torch.Tensor, *, amp: bool = True) -> torch.Tensor:
    """Run ``model`` on one image (3, H, W) in [0, 1]; returns (3, s·H, s·W) float32 on the CPU, clamped to [0, 1].

    The image is moved to the model's device; ``amp`` uses bf16 autocast there when it is a CUDA device.
    """
    if img.dim() != 3 or img.shape[0] != 3:
        raise ValueError(f"expected an RGB image (3, H, W), got shape {tuple(img.shape)}")
    device = next(model.parameters()).device
    with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=amp and device.type == "cuda"):
        out = model(img.unsqueeze(0).to(device))
    return out[0].float().clamp_(0, 1).cpu()


def upscale_file(model: nn.Module, src: PathLike, dst: PathLike, *, amp: bool = True) -> ImageInfo:
    """Read ``src``, upscale it, write ``dst`` as an 8-bit PNG (atomically); raises :class:`ImageReadError` for an
    unreadable input. Returns what the input held (mode, bit depth, alpha)."""
    img, info = load_image(src)
    out = upscale_tensor(model, img, amp=amp)
    Path(dst).parent.mkdir(parents=True, exist_ok=True)
    save_png(out, dst, grayscale=info.grayscale)
    return info


def list_inputs(path: PathLike) -> List[Path]:
    """A file -> [file]; a folder -> its regular files (not recursive), sorted, without hidden and OS-metadata
    files. Every listed file is meant to be an image: one that is not is reported by the caller, not skipped."""
    path = Path(path)
    if path.is_dir():
        return sorted(p for p in path.iterdir()
                      if p.is_file() and not p.name.startswith(".") and p.name.lower() not in _JUNK_NAMES)
    return [path]


def output_path_for(src: PathLike, out_dir: PathLike, scale: int) -> Path:
    """``{out_dir}/{name}_x{scale}.png`` for an input ``{name}.{ext}``."""
    return Path(out_dir) / f"{Path(src).stem}_x{int(scale)}.png"


def default_output_dir(input_path: PathLike, scale: int) -> Path:
    """Beside the input: a file's own folder; for a folder ``F``, the sibling folder ``F_x{scale}``."""
    p = Path(input_path)
    if p.is_dir():
        p = p.resolve()
        return p.with_name(f"{p.name}_x{int(scale)}")
    return p.parent


def resolve_device(name: Optional[str]) -> torch.device:
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("CUDA is not available on this machine: use --device cpu")
    return dev
