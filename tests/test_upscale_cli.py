"""examples/upscale.py and rfsr_cuda.upscale with a tiny model: sizes, pixels, bad inputs, missing weights."""
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from rfsr_cuda.image_io import load_image
from rfsr_cuda.models import create_model, save_checkpoint
from rfsr_cuda.upscale import find_bundled_weights, load_model, upscale_tensor

REPO = Path(__file__).resolve().parents[1]
TINY = dict(dim=12, window_sizes=[4, 8], num_heads=[2, 2], ranks=[4, 4], n_blocks=1, exp_ratio=1.5,
            rib_hidden_dim=8, rib_n_freqs=4, upsampler_type="pixelshuffle_direct", gate_type="DWC")


def _cli():
    spec = importlib.util.spec_from_file_location("rfsr_example_upscale", REPO / "examples" / "upscale.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def cli():
    return _cli()


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    torch.manual_seed(0)
    model = create_model("sst_light", upscaling_factor=2, **TINY)
    with torch.no_grad():  # move the output away from the plain nearest-neighbour skip
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    path = tmp_path_factory.mktemp("w") / "tiny_x2.safetensors"
    save_checkpoint(model, path)
    return path


def _picture(h, w, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)


def test_single_file_size_and_pixels(cli, weights, tmp_path):
    src = tmp_path / "in.png"
    Image.fromarray(_picture(20, 28)).save(src)
    out = tmp_path / "out"
    assert cli.main([str(src), "--weights", str(weights), "-o", str(out), "--device", "cpu", "-q"]) == 0
    dst = out / "in_x2.png"
    with Image.open(dst) as im:
        assert im.size == (56, 40) and im.mode == "RGB"
        got = np.asarray(im)
    model = load_model(weights, "cpu")
    expect = upscale_tensor(model, load_image(src)[0])
    expect = (expect * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    np.testing.assert_array_equal(got, expect)
    assert sorted(p.name for p in out.iterdir()) == ["in_x2.png"]  # no temporary files left behind


def test_default_output_places_and_explicit_png(cli, weights, tmp_path):
    folder = tmp_path / "pics"
    folder.mkdir()
    Image.fromarray(_picture(12, 10, 1)).save(folder / "a.png")
    Image.fromarray(_picture(12, 10, 1)[..., 0]).save(folder / "gray.png")  # grayscale in, grayscale out
    assert cli.main([str(folder / "a.png"), "--weights", str(weights), "--device", "cpu", "-q"]) == 0
    assert (folder / "a_x2.png").is_file()  # a file's output goes beside it
    (folder / "a_x2.png").unlink()
    assert cli.main([str(folder), "--weights", str(weights), "--device", "cpu", "-q"]) == 0
    sibling = tmp_path / "pics_x2"  # a folder's output goes to the sibling F_x{S}
    assert sorted(p.name for p in sibling.iterdir()) == ["a_x2.png", "gray_x2.png"]
    with Image.open(sibling / "gray_x2.png") as im:
        assert im.mode == "L" and im.size == (20, 24)
    target = tmp_path / "named.png"
    assert cli.main([str(folder / "a.png"), "--weights", str(weights), "-o", str(target), "-q"]) == 0
    with Image.open(target) as im:
        assert im.size == (20, 24)


def test_folder_with_bad_files_processes_the_good_ones(cli, weights, tmp_path, capsys):
    folder = tmp_path / "mixed"
    folder.mkdir()
    Image.fromarray(_picture(16, 16, 2)).save(folder / "good1.png")
    Image.fromarray(_picture(18, 14, 3)).save(folder / "good2.jpg")
    full = (folder / "good1.png").read_bytes()
    (folder / "broken.png").write_bytes(full[: len(full) // 2])  # truncated PNG
    (folder / "readme.txt").write_text("hello")
    (folder / ".DS_Store").write_bytes(b"\x00\x01")  # hidden: skipped silently
    out = tmp_path / "out"
    rc = cli.main([str(folder), "--weights", str(weights), "-o", str(out), "--device", "cpu"])
    assert rc == 1
    assert sorted(p.name for p in out.iterdir()) == ["good1_x2.png", "good2_x2.png"]
    with Image.open(out / "good2_x2.png") as im:
        assert im.size == (28, 36)
    err = capsys.readouterr().err.splitlines()
    errors = [line for line in err if line.startswith("upscale.py: error:")]
    assert len(errors) == 2
    assert any("broken.png" in e for e in errors) and any("readme.txt" in e for e in errors)
    assert any("2 of 4 image(s) written" in line and "2 failed" in line for line in err)


def test_no_weights_message_and_status(cli, tmp_path, capsys):
    src = tmp_path / "in.png"
    Image.fromarray(_picture(10, 10)).save(src)
    assert find_bundled_weights(3) is None
    assert cli.main([str(src), "--scale", "3"]) == 2
    err = capsys.readouterr().err
    assert "--weights" in err and "sst_light_x3.safetensors" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.png"]  # nothing written


def test_scale_mismatch_and_missing_input(cli, weights, tmp_path, capsys):
    src = tmp_path / "in.png"
    Image.fromarray(_picture(10, 10)).save(src)
    assert cli.main([str(src), "--weights", str(weights), "--scale", "4"]) == 2
    assert "x2 model" in capsys.readouterr().err
    assert cli.main([str(tmp_path / "nope.png"), "--weights", str(weights)]) == 2
    not_weights = tmp_path / "bad.safetensors"
    not_weights.write_bytes(b"garbage")
    assert cli.main([str(src), "--weights", str(not_weights)]) == 2
    assert "cannot load weights" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.safetensors", "in.png"]


def test_cli_subprocess_exit_codes(weights, tmp_path):
    folder = tmp_path / "f"
    folder.mkdir()
    Image.fromarray(_picture(12, 12, 4)).save(folder / "ok.png")
    (folder / "x.png").write_bytes(b"not a png at all")
    env = dict(os.environ)  # the installed rfsr_cuda (with its compiled _C) is the one the scripts import
    script = str(REPO / "examples" / "upscale.py")
    proc = subprocess.run([sys.executable, script, str(folder), "--weights", str(weights), "--device", "cpu"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr
    assert (tmp_path / "f_x2" / "ok_x2.png").is_file()
    assert "x.png: not an image" in proc.stderr
    proc = subprocess.run([sys.executable, script, str(folder / "ok.png")], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 2 and "--weights" in proc.stderr
