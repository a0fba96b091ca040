"""examples/upscale.py (rfsr_cuda.upscale.cli) with a tiny model: sizes, pixels, bad inputs, missing weights, batch
layout (recursive, globs, skip/overwrite), Real-ESRGAN flag spellings, video."""
import importlib.util
import os
import shutil
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
    assert sorted(p.name for p in out.iterdir()) == ["good1_x2.png", "good2_x2.jpg"]  # --ext auto keeps jpg
    with Image.open(out / "good2_x2.jpg") as im:
        assert im.size == (28, 36)
    err = capsys.readouterr().err.splitlines()
    errors = [line for line in err if line.startswith("upscale.py: error:")]
    assert len(errors) == 2
    assert any("broken.png" in e for e in errors) and any("readme.txt" in e for e in errors)
    assert any("2 of 4 file(s) written" in line and "2 failed" in line for line in err)


def test_no_weights_message_and_status(cli, tmp_path, capsys, monkeypatch):
    src = tmp_path / "in.png"
    Image.fromarray(_picture(10, 10)).save(src)
    import rfsr_cuda.upscale.cli as cli_impl
    monkeypatch.setattr(cli_impl, "find_bundled_weights", lambda *a, **k: None)  # an install without weights
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
    assert find_bundled_weights(7) is None
    proc = subprocess.run([sys.executable, script, str(folder / "ok.png"), "--scale", "7"], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "--weights" in proc.stderr and "sst_light_x7" in proc.stderr


def test_bundled_weights_are_the_default_and_named(cli, tmp_path, capsys):
    assert find_bundled_weights(2) is not None  # the package ships sst_light_x{2,3,4}
    src = tmp_path / "in.png"
    Image.fromarray(_picture(20, 18, 11)).save(src)
    assert cli.main([str(src), "--scale", "2"]) == 0
    assert "weights: bundled sst_light_x2.safetensors" in capsys.readouterr().out
    with Image.open(tmp_path / "in_x2.png") as im:
        assert im.size == (36, 40)


# ------------------------------------------------------------------------------------------ batch behaviour
def test_recursive_layout_skip_existing_and_suffix_ext(cli, weights, tmp_path, capsys):
    root = tmp_path / "tree"
    (root / "sub" / "deeper").mkdir(parents=True)
    Image.fromarray(_picture(12, 14, 5)).save(root / "top.png")
    Image.fromarray(_picture(12, 14, 6)).save(root / "sub" / "a.jpg")
    Image.fromarray(_picture(12, 14, 7)).save(root / "sub" / "deeper" / "b.webp")
    out = tmp_path / "out"
    args = [str(root), "--weights", str(weights), "-o", str(out), "--recursive", "-q"]
    assert cli.main(args + ["--suffix", "up", "--ext", "png"]) == 0
    got = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert got == ["sub/a_up.png", "sub/deeper/b_up.png", "top_up.png"]
    assert cli.main(args) == 0  # --ext auto keeps the formats, default suffix x{scale}
    assert (out / "sub" / "a_x2.jpg").is_file() and (out / "sub" / "deeper" / "b_x2.webp").is_file()
    # not recursive: only the top level
    flat = tmp_path / "flat"
    assert cli.main([str(root), "--weights", str(weights), "-o", str(flat), "-q"]) == 0
    assert sorted(p.name for p in flat.iterdir()) == ["top_x2.png"]
    # --skip-existing leaves existing outputs alone; the default replaces them
    marker = out / "top_x2.png"
    marker.write_bytes(b"old")
    capsys.readouterr()
    assert cli.main(args[:-1] + ["--skip-existing"]) == 0
    assert marker.read_bytes() == b"old"
    assert "3 skipped" in capsys.readouterr().out
    assert cli.main(args + ["--overwrite"]) == 0
    with Image.open(marker) as im:
        assert im.size == (28, 24)
    # an output folder inside the input tree is not scanned as input
    inner = root / "results"
    assert cli.main([str(root), "--weights", str(weights), "-o", str(inner), "-r", "-q"]) == 0
    assert cli.main([str(root), "--weights", str(weights), "-o", str(inner), "-r", "-q"]) == 0
    assert len([p for p in inner.rglob("*") if p.is_file()]) == 3
    shutil.rmtree(inner)
    # globs; an input is never overwritten (empty suffix, output beside the input)
    glob_out = tmp_path / "glob"
    assert cli.main([str(root / "**" / "*.jpg"), "--weights", str(weights), "-o", str(glob_out), "-q"]) == 0
    assert (glob_out / "sub" / "a_x2.jpg").is_file()
    before = (root / "top.png").read_bytes()
    assert cli.main([str(root / "top.png"), "--weights", str(weights), "--suffix", "", "-q"]) == 1
    assert (root / "top.png").read_bytes() == before
    assert "would overwrite an input" in capsys.readouterr().err


def test_bad_inputs_one_line_each(cli, weights, tmp_path, capsys):
    folder = tmp_path / "bad"
    folder.mkdir()
    Image.fromarray(_picture(16, 16, 8)).save(folder / "ok.png")
    (folder / "empty.png").write_bytes(b"")
    Image.fromarray(_picture(40, 40, 9)).save(folder / "big.png")
    data = (folder / "ok.png").read_bytes()
    (folder / "corrupt.png").write_bytes(data[:40] + bytes(200) + data[240:])
    out = tmp_path / "out"
    rc = cli.main([str(folder), "--weights", str(weights), "-o", str(out), "--max-pixels", "0.001"])
    assert rc == 1
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("upscale.py: error:")]
    assert len(err) == 3
    assert any("empty.png" in e and "empty file" in e for e in err)
    assert any("big.png" in e and "too large" in e for e in err)
    assert any("corrupt.png" in e for e in err)
    assert sorted(p.name for p in out.iterdir()) == ["ok_x2.png"]  # and no temporary files


def test_flags_realesrgan_spellings_outscale_and_memory_report(cli, weights, tmp_path, capsys):
    src = tmp_path / "in.png"
    Image.fromarray(_picture(20, 24, 10)).save(src)
    out = tmp_path / "o"
    assert cli.main(["-i", str(src), "-o", str(out), "--model_path", str(weights), "-s", "3", "-t", "16",
                     "--tile_pad", "8", "--fp32", "-g", "0", "--device", "cpu", "--alpha_upsampler", "bicubic",
                     "--report-memory"]) == 0
    with Image.open(out / "in_x2.png") as im:
        assert im.size == (72, 60)  # --outscale 3 on a x2 network
    text = capsys.readouterr().out
    assert "peak host RSS" in text and "1 of 1 file(s) written" in text
    assert cli.main([str(src), "--weights", str(weights), "--precision", "fp16", "-o", str(tmp_path / "h"),
                     "-q"]) == 0
    parser = cli.build_parser()
    assert parser.parse_args([str(src)]).prepared is None  # the Upscaler decides (prepared copy on CUDA bf16/fp16)
    assert parser.parse_args([str(src), "--autocast"]).prepared is False


def _make_video(path, frames=5, size=(32, 24), audio=True):
    import imageio_ffmpeg
    exe = imageio_ffmpeg.get_ffmpeg_exe()
    w, h = size
    cmd = [exe, "-y", "-v", "error", "-f", "lavfi", "-i", f"testsrc=size={w}x{h}:rate=10"]
    if audio:
        cmd += ["-f", "lavfi", "-i", "sine=frequency=440:sample_rate=16000"]
    cmd += ["-frames:v", str(frames), "-t", str(frames / 10), "-c:v", "libx264", "-pix_fmt", "yuv444p"]
    if audio:
        cmd += ["-c:a", "aac", "-shortest"]
    subprocess.run(cmd + [str(path)], check=True)


def test_video_round_trip(cli, weights, tmp_path):
    pytest.importorskip("imageio_ffmpeg")
    from rfsr_cuda.upscale import probe_video
    folder = tmp_path / "v"
    folder.mkdir()
    _make_video(folder / "clip.mp4")
    (folder / "broken.mkv").write_bytes(b"\x1a\x45\xdf\xa3 not really a video")
    out = tmp_path / "out"
    assert cli.main([str(folder), "--weights", str(weights), "-o", str(out), "-q"]) == 1  # broken.mkv fails
    assert sorted(p.name for p in out.iterdir()) == ["clip_x2.mp4"]
    meta = probe_video(out / "clip_x2.mp4")
    assert meta["size"] == (64, 48) and abs(meta["fps"] - 10) < 1e-6
    assert meta.get("audio_codec")  # the audio was kept
    import imageio_ffmpeg
    frames = list(imageio_ffmpeg.read_frames(str(out / "clip_x2.mp4")))[1:]
    assert len(frames) == 5
