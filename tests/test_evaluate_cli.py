"""examples/evaluate.py: per-image PSNR/SSIM-Y of a model against bicubic and Lanczos."""
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from rfsr_cuda.imresize import imresize
from rfsr_cuda.metrics import evaluate_image
from rfsr_cuda.models import SST, save_checkpoint
from rfsr_cuda.train import load_validation_set

REPO = Path(__file__).resolve().parents[1]


def _example():
    spec = importlib.util.spec_from_file_location("rfsr_example_evaluate", REPO / "examples" / "evaluate.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_evaluate_reports_every_image_and_the_mean(tmp_path):
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:50, 0:62]
    for i in range(2):
        img = 128 + 80 * np.sin(x * (0.1 + 0.05 * i) + y * 0.07)[..., None] + rng.normal(0, 8, (50, 62, 3))
        Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(tmp_path / f"im{i}.png")
    model = SST(dim=12, window_sizes=[4, 8], num_heads=[2, 2], ranks=[4, 4], n_blocks=1, rib_hidden_dim=8,
                rib_n_freqs=2, upscaling_factor=2, upsampler_type="pixelshuffle_direct")
    save_checkpoint(model, tmp_path / "w.safetensors")
    out = tmp_path / "r.json"
    rc = _example().main([str(tmp_path), "--scale", "2", "--weights", str(tmp_path / "w.safetensors"),
                          "--device", "cpu", "--json", str(out), "--md", str(tmp_path / "t.md")])
    assert rc == 0
    res = json.loads(out.read_text())
    assert sorted(res["images"]) == ["im0", "im1"]
    name, lr, hr = load_validation_set(tmp_path, 2)[0]
    bic = evaluate_image(imresize(lr.double(), 2.0).float().clamp(0, 1), hr, 2)
    assert res["images"][name]["bicubic"]["psnr"] == pytest.approx(bic["psnr"], abs=1e-9)
    for meth in ("bicubic", "lanczos", "model"):
        mean = np.mean([r[meth]["psnr"] for r in res["images"].values()])
        assert res["mean"][meth]["psnr"] == pytest.approx(mean)
    assert "| **mean** |" in (tmp_path / "t.md").read_text()


def test_evaluate_rejects_weights_of_another_scale(tmp_path, capsys):
    model = SST(dim=12, window_sizes=[4], num_heads=[2], ranks=[2], n_blocks=1, rib_hidden_dim=8, rib_n_freqs=2,
                upscaling_factor=3, upsampler_type="pixelshuffle_direct")
    save_checkpoint(model, tmp_path / "w.safetensors")
    assert _example().main([str(tmp_path), "--scale", "2", "--weights", str(tmp_path / "w.safetensors"),
                            "--device", "cpu"]) == 2
    assert "x3, not x2" in capsys.readouterr().err
