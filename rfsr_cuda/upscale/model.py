"""Loading an SST for inference: bundled weights, checkpoint files, devices."""
from __future__ import annotations

import importlib.resources
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional, Union

import torch
from torch import nn

__all__ = ["DEFAULT_PRESET", "bundled_weights_name", "find_bundled_weights", "load_model", "model_scale",
           "resolve_device"]

DEFAULT_PRESET = "sst_light"


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
    from ..models import model_from_checkpoint

    with _as_path(weights) as path:
        model = model_from_checkpoint(path, preset=preset) if preset else model_from_checkpoint(path)
    return model.to(device).eval()


def model_scale(model: nn.Module) -> int:
    return int(model.config.upscaling_factor)


def resolve_device(name: Optional[str], gpu_id: Optional[int] = None) -> torch.device:
    """auto -> cuda (device ``gpu_id``) when available, else cpu; RuntimeError for cuda without CUDA."""
    if name in (None, "auto"):
        name = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(name)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("CUDA is not available on this machine: use --device cpu")
        if dev.index is None and gpu_id is not None:
            dev = torch.device("cuda", int(gpu_id))
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise RuntimeError(f"no GPU {dev.index}: this machine has {torch.cuda.device_count()}")
    return dev
