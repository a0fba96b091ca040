"""The SST-light weights shipped in the package: loadable, described, and better than bicubic on held-out images."""
import importlib.util
import os

import numpy as np
import pytest
import torch
from PIL import Image

from rfsr_cuda.imresize import bicubic_downsample, imresize
from rfsr_cuda.metrics import evaluate_image
from rfsr_cuda.models import get_config
from rfsr_cuda.models.checkpoint import read_checkpoint
from rfsr_cuda.upscale import find_bundled_weights, load_model

SCALES = (2, 3, 4)


def _heldout(name):
    """A Set14 member that the training split never saw (read from the sporco wheel, as scripts/get_images.py)."""
    spec = importlib.util.find_spec("sporco")
    if spec is None:
        pytest.skip("sporco (data files only) is not installed")
    path = os.path.join(list(spec.submodule_search_locations)[0], "data", name)
    return np.asarray(Image.open(path).convert("RGB"))


@pytest.mark.parametrize("scale", SCALES)
def test_bundled_weights_load_as_sst_light(scale):
    path = find_bundled_weights(scale)
    assert path is not None, f"sst_light_x{scale}.safetensors is missing from the package"
    model = load_model(path)
    expect = get_config("sst_light", upscaling_factor=scale)
    assert model.config == expect  # the preset, 'fused' backend included
    _, meta = read_checkpoint(str(path))
    assert "monarch" in meta["val_images"] and float(meta["val_psnr_y"]) > 20
    assert os.path.getsize(str(path)) < 2.5e6  # float16 storage keeps the three files under 10 MB


# a centre crop (96 px a side in LR) of each held-out image; mean gains measured for the shipped weights:
# x2 +1.56, x3 +1.33, x4 +1.23 dB
@pytest.mark.parametrize("scale,min_gain", [(2, 1.2), (3, 1.0), (4, 0.9)])
def test_bundled_weights_beat_bicubic_on_heldout_crops(scale, min_gain):
    model = load_model(find_bundled_weights(scale))
    gains = []  # per image, so a failure shows both
    for name in ("monarch.png", "barbara.png"):
        hr_full = _heldout(name)
        h, w = hr_full.shape[:2]
        size = 96 * scale
        top, left = (h - size) // 2, (w - size) // 2
        hr = torch.from_numpy(hr_full[top:top + size, left:left + size].astype(np.float64) / 255).permute(2, 0, 1)
        lr = (bicubic_downsample(hr, scale).clamp(0, 1) * 255).round() / 255
        with torch.inference_mode():
            sr = model(lr.float()[None])[0].clamp(0, 1)
        bic = imresize(lr, float(scale)).clamp(0, 1)
        gains.append(evaluate_image(sr, hr, scale)["psnr"] - evaluate_image(bic, hr, scale)["psnr"])
    assert np.mean(gains) >= min_gain, gains
