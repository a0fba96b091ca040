"""Training and validation data: HR images from a folder, LR made on the fly with MATLAB-compatible bicubic.

Every training sample is a pure function of ``(seed, sample_number)``: the image comes from a per-epoch permutation
of the folder and the crop/flip/rotation from a generator seeded with the sample number. A run resumed at step ``t``
therefore sees exactly the batches an uninterrupted run would, whatever the number of loader workers.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Dict, List, Optional, Tuple, Union

import numpy as np
import torch
from torch.utils.data import Dataset

from ..image_io import ImageReadError, is_image_file, read_rgb
from ..imresize import bicubic_downsample, modcrop

__all__ = ["list_images", "HRFolderDataset", "load_validation_set", "augment", "quantize_8bit"]

PathLike = Union[str, os.PathLike]


def list_images(folder: PathLike) -> List[Path]:
    """Image files (by extension) under ``folder``, recursively, sorted; hidden files and folders are skipped."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"not a folder: {folder}")
    found = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found.extend(Path(root) / f for f in files if not f.startswith(".") and is_image_file(f))
    return sorted(found)


def _to_unit_float(arr: np.ndarray) -> np.ndarray:
    peak = 65535.0 if arr.dtype == np.uint16 else 255.0
    return arr.astype(np.float64) / peak


def quantize_8bit(x: torch.Tensor) -> torch.Tensor:
    """Round a [0, 1] image to the 256 levels an 8-bit file would store (benchmark LR images are 8-bit PNGs)."""
    return (x.clamp(0, 1) * 255.0).round() / 255.0


def augment(img: np.ndarray, hflip: bool, vflip: bool, transpose: bool) -> np.ndarray:
    """One of the 8 dihedral transforms of an (H, W, C) array (``transpose`` = rot90 together with a flip)."""
    if hflip:
        img = img[:, ::-1]
    if vflip:
        img = img[::-1]
    if transpose:
        img = img.transpose(1, 0, 2)
    return img


def _pad_to(img: np.ndarray, size: int) -> np.ndarray:
    """Reflect-pad (edge pixel not repeated) bottom/right so both sides are at least ``size``."""
    ph, pw = max(0, size - img.shape[0]), max(0, size - img.shape[1])
    if not ph and not pw:
        return img
    mode = "reflect" if min(img.shape[:2]) > 1 else "edge"
    return np.pad(img, ((0, ph), (0, pw), (0, 0)), mode=mode)


class HRFolderDataset(Dataset):
    """Random (LR, HR) training pairs from the HR images in a folder.

    Item ``k`` is the ``k``-th sample of the run: an HR crop of ``lr_patch * scale`` pixels (reflect-padded when the
    image is smaller), a random flip/rot90 when ``augment``, and the LR patch from :func:`bicubic_downsample`
    (rounded to 8-bit levels when ``quantize_lr``). Both are float32 (3, h, w) in [0, 1]. ``len()`` is one pass over
    the images; use any range of sample numbers as the sampler.
    """

    def __init__(
        self,
        folder: PathLike,
        scale: int,
        lr_patch: int,
        *,
        augment: bool = True,
        quantize_lr: bool = True,
        seed: int = 0,
        cache: bool = False,
    ):
        self.paths = list_images(folder)
        if not self.paths:
            raise FileNotFoundError(f"no images in {folder}")
        self.scale = int(scale)
        self.lr_patch = int(lr_patch)
        self.gt_size = self.lr_patch * self.scale
        self.augment = augment
        self.quantize_lr = quantize_lr
        self.seed = int(seed)
        self._cache: Optional[Dict[int, np.ndarray]] = {} if cache else None
        self._perm_epoch = -1
        self._perm: Optional[np.ndarray] = None

    def __len__(self) -> int:
        return len(self.paths)

    def _image(self, i: int) -> np.ndarray:
        if self._cache is not None and i in self._cache:
            return self._cache[i]
        try:
            arr, _ = read_rgb(self.paths[i])
        except ImageReadError as e:
            raise ImageReadError(f"{self.paths[i]}: {e}") from None
        if self._cache is not None:
            self._cache[i] = arr
        return arr

    def image_index(self, sample: int) -> int:
        n = len(self.paths)
        epoch, pos = divmod(int(sample), n)
        if epoch != self._perm_epoch:
            self._perm = np.random.default_rng([self.seed, epoch, 1]).permutation(n)
            self._perm_epoch = epoch
        return int(self._perm[pos])

    def __getitem__(self, sample: int) -> Tuple[torch.Tensor, torch.Tensor]:
        if sample < 0:
            raise IndexError(sample)
        rng = np.random.default_rng([self.seed, int(sample), 2])
        img = _pad_to(self._image(self.image_index(sample)), self.gt_size)
        h, w = img.shape[:2]
        top = int(rng.integers(0, h - self.gt_size + 1))
        left = int(rng.integers(0, w - self.gt_size + 1))
        crop = img[top : top + self.gt_size, left : left + self.gt_size]
        flips = rng.random(3) < 0.5
        if self.augment:
            crop = augment(crop, *map(bool, flips))
        hr = torch.from_numpy(np.ascontiguousarray(_to_unit_float(crop))).permute(2, 0, 1)
        lr = bicubic_downsample(hr, self.scale)
        if self.quantize_lr:
            lr = quantize_8bit(lr)
        return lr.float(), hr.float()


def load_validation_set(
    folder: PathLike, scale: int, *, quantize_lr: bool = True
) -> List[Tuple[str, torch.Tensor, torch.Tensor]]:
    """``[(name, lr, hr), ...]`` for every image in ``folder``: HR mod-cropped to the scale, LR its bicubic
    down-sampling (8-bit levels when ``quantize_lr``), both float32 (3, h, w) in [0, 1]."""
    items = []
    for path in list_images(folder):
        try:
            arr, _ = read_rgb(path)
        except ImageReadError as e:
            raise ImageReadError(f"{path}: {e}") from None
        hr = modcrop(torch.from_numpy(_to_unit_float(arr)).permute(2, 0, 1), scale)
        if min(hr.shape[-2:]) < scale:
            raise ValueError(f"{path}: image smaller than the scale")
        lr = bicubic_downsample(hr, scale)
        if quantize_lr:
            lr = quantize_8bit(lr)
        items.append((path.stem, lr.float().contiguous(), hr.float().contiguous()))
    if not items:
        raise FileNotFoundError(f"no images in {folder}")
    return items
