"""Training data, schedule, EMA, and a short CPU run of the loop: the loss falls and a resumed run is exact."""
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from rfsr_cuda.imresize import bicubic_downsample, modcrop
from rfsr_cuda.train import (HRFolderDataset, ModelEMA, TrainConfig, WarmupSchedule, list_images,
                             load_training_state, load_validation_set, train)
from rfsr_cuda.train.data import quantize_8bit

REPO = Path(__file__).resolve().parents[1]

# a tiny SST (fast on two CPU cores); windows 4 and 8, so LR patches of 16 need no padding
TINY = dict(dim=12, window_sizes=[4, 8], num_heads=[2, 2], ranks=[4, 4], n_blocks=1, exp_ratio=1.5,
            rib_hidden_dim=8, rib_n_freqs=4, upsampler_type="pixelshuffle_direct", gate_type="DWC")


def _texture(h, w, seed):
    """A smooth-plus-detail RGB test picture (uint8): gradients, oriented stripes and a few blobs."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    chans = []
    for c in range(3):
        fx, fy = rng.uniform(0.05, 0.35, 2)
        v = 0.5 + 0.25 * np.sin(fx * x + fy * y + c) + 0.15 * (x / w - y / h)
        for _ in range(4):
            cx, cy, r = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(3, 9)
            v += 0.2 * np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * r * r))
        chans.append(v)
    return (np.clip(np.stack(chans, -1), 0, 1) * 255).round().astype(np.uint8)


@pytest.fixture(scope="module")
def image_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("imgs")
    train_dir, val_dir = root / "train", root / "val"
    (train_dir / "sub").mkdir(parents=True)
    val_dir.mkdir()
    Image.fromarray(_texture(72, 88, 1)).save(train_dir / "a.png")
    Image.fromarray(_texture(64, 60, 2)).save(train_dir / "sub" / "b.jpg", quality=95)
    (train_dir / "notes.txt").write_text("not an image")
    Image.fromarray(_texture(8, 8, 9)).save(train_dir / ".hidden.png")
    Image.fromarray(_texture(50, 46, 3)).save(val_dir / "v.png")
    return train_dir, val_dir


# --- data ---------------------------------------------------------------------------------------------------------

def test_list_images(image_dirs):
    train_dir, _ = image_dirs
    assert [p.relative_to(train_dir).as_posix() for p in list_images(train_dir)] == ["a.png", "sub/b.jpg"]


def test_dataset_pairs_are_bicubic_and_deterministic(image_dirs):
    train_dir, _ = image_dirs
    ds = HRFolderDataset(train_dir, scale=2, lr_patch=16, seed=5)
    lr, hr = ds[3]
    assert lr.shape == (3, 16, 16) and hr.shape == (3, 32, 32)
    assert lr.dtype == hr.dtype == torch.float32
    # LR = bicubic_downsample(HR) stored at 8-bit levels
    assert torch.equal(lr, quantize_8bit(bicubic_downsample(hr.double(), 2)).float())
    assert torch.equal((lr * 255).round() / 255, lr)
    # HR is a crop of one of the images, up to a flip/transpose: its values are 8-bit levels
    assert torch.equal((hr * 255).round() / 255, hr)
    lr2, hr2 = HRFolderDataset(train_dir, scale=2, lr_patch=16, seed=5)[3]
    assert torch.equal(hr, hr2) and torch.equal(lr, lr2)
    assert not torch.equal(hr, ds[4][1])
    assert not torch.equal(hr, HRFolderDataset(train_dir, scale=2, lr_patch=16, seed=6)[3][1])


def test_dataset_epochs_visit_every_image(image_dirs):
    train_dir, _ = image_dirs
    ds = HRFolderDataset(train_dir, scale=2, lr_patch=8, seed=0)
    for epoch in range(4):
        assert sorted(ds.image_index(epoch * 2 + i) for i in range(2)) == [0, 1]


def test_dataset_crop_is_exact_and_augments(tmp_path):
    img = _texture(40, 40, 7)
    Image.fromarray(img).save(tmp_path / "x.png")
    ds = HRFolderDataset(tmp_path, scale=4, lr_patch=10, seed=0)  # gt 40 = the whole image
    seen = set()
    ref = torch.from_numpy(img.astype(np.float64) / 255).permute(2, 0, 1).float()
    variants = [ref, ref.flip(-1), ref.flip(-2), ref.flip(-1).flip(-2), ref.transpose(-1, -2),
                ref.flip(-1).transpose(-1, -2), ref.flip(-2).transpose(-1, -2), ref.flip(-1).flip(-2).transpose(-1, -2)]
    for k in range(40):
        hr = ds[k][1]
        match = [i for i, v in enumerate(variants) if torch.equal(hr, v)]
        assert len(match) == 1
        seen.add(match[0])
    assert len(seen) == 8
    plain = HRFolderDataset(tmp_path, scale=4, lr_patch=10, augment=False)
    assert all(torch.equal(plain[k][1], ref) for k in range(5))


def test_dataset_pads_small_images_by_reflection(tmp_path):
    img = _texture(20, 30, 4)
    Image.fromarray(img).save(tmp_path / "small.png")
    ds = HRFolderDataset(tmp_path, scale=2, lr_patch=16, augment=False)  # gt 32 > 20 and > 30
    hr = (ds[0][1] * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    assert hr.shape == (32, 32, 3)
    np.testing.assert_array_equal(hr[:20, :30], img)
    np.testing.assert_array_equal(hr[20, :30], img[18])  # reflection without repeating the edge row (19)
    np.testing.assert_array_equal(hr[:20, 30], img[:, 28])


def test_validation_set_is_modcropped(image_dirs):
    _, val_dir = image_dirs
    (name, lr, hr), = load_validation_set(val_dir, 4)
    assert name == "v" and hr.shape == (3, 48, 44) and lr.shape == (3, 12, 11)
    assert torch.equal(lr, quantize_8bit(bicubic_downsample(hr.double(), 4)).float())


# --- schedule and EMA ---------------------------------------------------------------------------------------------

def test_warmup_multistep_schedule():
    f = WarmupSchedule(100, warmup=10, kind="multistep", milestones=[50, 80], gamma=0.5)
    assert [f(t) for t in (0, 4, 9, 10, 49, 50, 79, 80, 99)] == [0.1, 0.5, 1.0, 1.0, 1.0, 0.5, 0.5, 0.25, 0.25]


def test_warmup_cosine_schedule():
    f = WarmupSchedule(110, warmup=10, kind="cosine", min_ratio=0.1)
    assert f(0) == pytest.approx(0.1) and f(10) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.1 + 0.9 * 0.5)  # half way through the decay
    assert f(110) == pytest.approx(0.1)
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=2.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, f)
    for _ in range(10):
        opt.step()
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(2.0)
    with pytest.raises(ValueError):
        WarmupSchedule(10, 1, kind="linear")


def test_default_warmup_and_milestones():
    cfg = TrainConfig(data="x", steps=500_000)
    assert cfg.resolved_warmup() == 20_000
    assert cfg.resolved_milestones() == [250_000, 400_000, 450_000, 475_000, 490_000]  # the official x2 recipe
    assert TrainConfig(data="x", steps=1000).resolved_warmup() == 40


def test_ema_update_values():
    torch.manual_seed(0)
    net = torch.nn.Linear(3, 2)
    ema = ModelEMA(net, decay=0.9)
    before = net.weight.detach().clone()
    with torch.no_grad():
        net.weight.add_(1.0)
    ema.update(net)
    torch.testing.assert_close(ema.module.weight, before + 0.1, rtol=0, atol=1e-6)
    ema.update(net)
    torch.testing.assert_close(ema.module.weight, before + 0.19, rtol=0, atol=1e-6)  # 0.9·0.1 + 0.1·1
    assert not ema.module.weight.requires_grad


# --- the loop -----------------------------------------------------------------------------------------------------

def _cfg(train_dir, val_dir, out, **kw):
    base = dict(data=str(train_dir), val=str(val_dir), scale=2, preset="sst_light", model_overrides=TINY,
                out=str(out), steps=20, batch_size=4, lr_patch=16, lr=2e-3, warmup=2, schedule="cosine",
                ema_decay=0.9, num_workers=0, device="cpu", seed=1, val_every=10, save_every=10, log_every=1,
                progress=False)
    base.update(kw)
    return TrainConfig(**base)


@pytest.fixture(scope="module")
def first_run(image_dirs, tmp_path_factory):
    train_dir, val_dir = image_dirs
    out = tmp_path_factory.mktemp("run1")
    result = train(_cfg(train_dir, val_dir, out))
    return out, result


def test_loss_falls_and_outputs_are_written(first_run):
    out, result = first_run
    losses = [l for _, l in result["losses"]]
    assert [s for s, _ in result["losses"]] == list(range(1, 21))
    assert all(math.isfinite(l) for l in losses)
    assert np.mean(losses[-5:]) < 0.7 * np.mean(losses[:5]), losses
    assert result["step"] == 20
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_00000010.pt", "step_00000020.pt"]
    val = result["val"]
    assert val["images"] == 1 and 10 < val["psnr"] < 60 and 0 < val["ssim"] <= 1
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "val_psnr" in r] == [10, 20]


def test_checkpoint_is_weights_only_and_complete(first_run):
    out, _ = first_run
    state = torch.load(out / "checkpoints" / "step_00000020.pt", map_location="cpu", weights_only=True)
    assert state["step"] == 20 and state["scale"] == 2
    assert {"model", "ema", "optimizer", "scheduler", "rng", "model_config", "train_config"} <= set(state)
    assert state["model_config"]["dim"] == 12 and state["model_config"]["upscaling_factor"] == 2
    assert state["scheduler"]["last_epoch"] == 20
    assert isinstance(state["rng"]["torch"], torch.Tensor)
    assert state["optimizer"]["param_groups"][0]["betas"] == (0.9, 0.9)
    assert not any(k != v for k, v in [(state["ema"]["proj.weight"].shape, state["model"]["proj.weight"].shape)])
    assert not torch.equal(state["ema"]["proj.weight"], state["model"]["proj.weight"])


def test_export_holds_the_ema_weights(first_run):
    from rfsr_cuda.models import model_from_checkpoint

    out, result = first_run
    assert result["export"] == str(out / "sst_light_x2.safetensors")
    model = model_from_checkpoint(result["export"])
    state = load_training_state(out / "checkpoints" / "step_00000020.pt")
    assert model.config.dim == 12 and model.config.upscaling_factor == 2
    for k, v in model.state_dict().items():
        if k in state["ema"]:
            assert torch.equal(v, state["ema"][k]), k


def test_resume_continues_exactly(first_run, image_dirs, tmp_path):
    out1, _ = first_run
    train_dir, val_dir = image_dirs
    (tmp_path / "checkpoints").mkdir()
    shutil.copy(out1 / "checkpoints" / "step_00000010.pt", tmp_path / "checkpoints")
    result = train(_cfg(train_dir, val_dir, tmp_path, resume="auto"))
    assert [s for s, _ in result["losses"]] == list(range(11, 21))
    a = load_training_state(out1 / "checkpoints" / "step_00000020.pt")
    b = load_training_state(tmp_path / "checkpoints" / "step_00000020.pt")
    for part in ("model", "ema"):
        assert a[part].keys() == b[part].keys()
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), (part, k)
    for i, st in a["optimizer"]["state"].items():
        assert torch.equal(st["exp_avg_sq"], b["optimizer"]["state"][i]["exp_avg_sq"])
        assert torch.equal(st["step"], b["optimizer"]["state"][i]["step"])
    assert a["scheduler"] == b["scheduler"]
    assert torch.equal(a["rng"]["torch"], b["rng"]["torch"])
    assert a["rng"]["python"] == b["rng"]["python"]


def test_resume_can_extend_a_run(first_run, image_dirs, tmp_path):
    out1, _ = first_run
    train_dir, val_dir = image_dirs
    ckpt = out1 / "checkpoints" / "step_00000020.pt"
    result = train(_cfg(train_dir, val_dir, tmp_path, resume=str(ckpt), steps=24, val_every=0, save_every=0))
    assert [s for s, _ in result["losses"]] == [21, 22, 23, 24]
    state = load_training_state(tmp_path / "checkpoints" / "step_00000024.pt")
    assert state["scheduler"]["last_epoch"] == 24
    assert state["scheduler"]["lr_lambdas"][0]["total_steps"] == 24  # the new schedule, not the saved one
    f = WarmupSchedule(24, warmup=2, kind="cosine")
    assert state["optimizer"]["param_groups"][0]["lr"] == pytest.approx(2e-3 * f(24))


def test_rng_state_round_trip():
    import random

    from rfsr_cuda.train.loop import _rng_state, _set_rng_state

    random.seed(3), np.random.seed(3), torch.manual_seed(3)
    saved = _rng_state()
    expect = (random.random(), np.random.rand(), torch.rand(1).item())
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    _set_rng_state(saved)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expect


def test_cli_init_from_another_scale(first_run, image_dirs, tmp_path):
    """examples/train.py: x3 started from the x2 export keeps the body weights (steps 0: nothing trained)."""
    from safetensors.torch import load_file

    out1, result = first_run
    train_dir, _ = image_dirs
    env = dict(os.environ)  # the installed rfsr_cuda (with its compiled _C) is the one the scripts import
    cmd = [sys.executable, str(REPO / "examples" / "train.py"), "--preset", "sst_light", "--scale", "3",
           "--data", str(train_dir), "--steps", "0", "--init", result["export"], "--model-config", json.dumps(TINY),
           "--out", str(tmp_path), "--device", "cpu", "--num-workers", "0", "--no-progress"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1].startswith("done: step 0/0")
    x2 = load_file(result["export"])
    x3 = load_file(tmp_path / "sst_light_x3.safetensors")
    body = [k for k in x2 if not k.startswith("upsampler")]
    assert body and all(torch.equal(x2[k], x3[k]) for k in body)
    assert any(x2[k].shape != x3[k].shape for k in x2 if k.startswith("upsampler"))


def test_time_limit_stops_saves_exports_and_resumes(image_dirs, tmp_path):
    train_dir, val_dir = image_dirs
    result = train(_cfg(train_dir, val_dir, tmp_path, steps=10_000, time_limit=0.0, val_every=0, save_every=0))
    steps_done = result["losses"][-1][0]
    assert steps_done == 1  # the limit is checked at the first log point
    assert (tmp_path / "checkpoints" / "step_00000001.pt").is_file()
    assert result["export"] and Path(result["export"]).is_file()
    state = load_training_state(tmp_path / "checkpoints" / "step_00000001.pt")
    assert state["scheduler"]["lr_lambdas"][0]["total_steps"] == 10_000  # the schedule keeps its length
    resumed = train(_cfg(train_dir, val_dir, tmp_path, steps=3, resume="auto", val_every=0, save_every=0))
    assert [s for s, _ in resumed["losses"]] == [2, 3]
