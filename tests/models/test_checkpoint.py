"""Checkpoints: official .pth layouts, rfsr safetensors round trip, config inference, scale resize, bad files."""
import json
import os
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from rfsr_cuda.models import SST, create_model, load_checkpoint, model_from_checkpoint, save_checkpoint
from rfsr_cuda.models import checkpoint as checkpoint_mod
from rfsr_cuda.models.checkpoint import read_checkpoint

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "official_sst"


def fixture_kwargs(name):
    return json.loads((FIXTURES / f"{name}.json").read_text())


def fixture_sd(name):
    return torch.load(FIXTURES / f"{name}.pth", weights_only=True)["params_ema"]


def fixture_io(name):
    data = np.load(FIXTURES / f"{name}.npz")
    return torch.from_numpy(data["input"]), torch.from_numpy(data["output"])


def tiny_model(seed=0, **kw):
    torch.manual_seed(seed)
    args = dict(dim=12, window_sizes=[4, 8], num_heads=[3, 2], ranks=[4, 6], n_blocks=1, exp_ratio=1.5,
                rib_hidden_dim=8, rib_n_freqs=3, gate_type="DWC", upscaling_factor=2)
    args.update(kw)
    model = SST(**args)
    with torch.no_grad():  # every tensor non-trivial, so a load that misses one shows up
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


def run(model, x):
    with torch.no_grad():
        return model(x)


@pytest.mark.parametrize("layout", ["params_ema", "params", "plain", "module_prefix"])
def test_official_layouts(tmp_path, layout):
    sd = fixture_sd("sst_base_x2")
    obj = {"params_ema": sd, "params": sd, "plain": sd,
           "module_prefix": {"params_ema": {f"module.{k}": v for k, v in sd.items()}}}[layout]
    if layout == "params":
        obj = {"params": sd}
    path = tmp_path / "ckpt.pth"
    torch.save(obj, path)
    model = SST(**fixture_kwargs("sst_base_x2"))
    missing, unexpected = load_checkpoint(model, path)
    assert missing == [] and unexpected == []
    loaded = model.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in sd.items())


def test_params_ema_preferred_over_params(tmp_path):
    sd = fixture_sd("sst_light_x4")
    torch.save({"params": {k: torch.zeros_like(v) for k, v in sd.items()}, "params_ema": sd}, tmp_path / "c.pth")
    model = SST(**fixture_kwargs("sst_light_x4"))
    load_checkpoint(model, tmp_path / "c.pth")
    assert all(torch.equal(model.state_dict()[k], v) for k, v in sd.items())


def test_safetensors_round_trip(tmp_path):
    model = tiny_model(attn_backend="reference")
    path = tmp_path / "model.safetensors"
    save_checkpoint(model, path, extra_metadata={"recipe": "unit test"})
    save_checkpoint(model, path)  # overwriting works
    save_checkpoint(model, path, extra_metadata={"recipe": "unit test"})
    assert sorted(os.listdir(tmp_path)) == ["model.safetensors"]  # no temporary files left behind
    sd, meta = read_checkpoint(path)
    assert meta["format"] == "rfsr.sst" and meta["recipe"] == "unit test" and "rfsr_version" in meta
    assert json.loads(meta["config"]) == model.config.to_dict()

    loaded = model_from_checkpoint(path)
    assert loaded.config == model.config
    x = torch.rand(2, 3, 10, 13)
    assert torch.equal(run(loaded.eval(), x), run(model, x))
    other = tiny_model(seed=1, attn_backend="reference")
    load_checkpoint(other, path)
    assert torch.equal(run(other, x), run(model, x))
    assert model_from_checkpoint(path, attn_backend="fused").config.attn_backend == "fused"


def test_save_is_atomic(tmp_path):
    path = tmp_path / "model.safetensors"
    save_checkpoint(tiny_model(), path)
    before = path.read_bytes()
    with mock.patch.object(checkpoint_mod, "save_file", side_effect=OSError("disk full")):
        with pytest.raises(OSError, match="disk full"):
            save_checkpoint(tiny_model(seed=1), path)
    assert path.read_bytes() == before and sorted(os.listdir(tmp_path)) == ["model.safetensors"]


def test_save_errors(tmp_path):
    model = tiny_model()
    with pytest.raises(ValueError, match=r"\.safetensors"):
        save_checkpoint(model, tmp_path / "model.pth")
    with pytest.raises(ValueError, match="reserved"):
        save_checkpoint(model, tmp_path / "m.safetensors", extra_metadata={"config": "{}"})
    with pytest.raises(TypeError, match="str to str"):
        save_checkpoint(model, tmp_path / "m.safetensors", extra_metadata={"step": 3})
    with pytest.raises(TypeError, match="SST"):
        save_checkpoint(torch.nn.Linear(2, 2), tmp_path / "m.safetensors")


def test_rfsr_file_of_another_config(tmp_path):
    path = tmp_path / "model.safetensors"
    save_checkpoint(tiny_model(), path)
    other_windows = tiny_model(window_sizes=[8, 4])  # same shapes, different function
    with pytest.raises(ValueError, match="window_sizes"):
        load_checkpoint(other_windows, path)
    load_checkpoint(other_windows, path, strict=False)
    x3 = tiny_model(upscaling_factor=3)  # the scale may differ: the upsampler is resized
    load_checkpoint(x3, path)


@pytest.mark.parametrize("ckpt, scale", [("sst_base_x2", None), ("sst_light_x4", None), ("sst_light_x4", 2)])
def test_model_from_official_checkpoint(ckpt, scale):
    kwargs = fixture_kwargs(ckpt)
    overrides = {"window_sizes": kwargs["window_sizes"], "attn_backend": "fused"}
    if scale:
        overrides["upscaling_factor"] = scale
    model = model_from_checkpoint(FIXTURES / f"{ckpt}.pth", **overrides)
    expected = SST(**{**kwargs, **overrides}).config
    assert model.config == expected  # everything but the window sizes was read from the tensor shapes
    if scale:  # the x4 file built as x2: up_conv resized as the official loader does (the fixture's output)
        x, y = fixture_io("sst_light_x4_as_x2_io")
        assert (run(model.eval(), x) - y).abs().max() <= 1e-4


def test_official_checkpoint_needs_window_sizes(tmp_path):
    with pytest.raises(ValueError, match="window sizes") as err:
        model_from_checkpoint(FIXTURES / "sst_light_x4.pth")
    assert "matches no preset" in str(err.value) and str(FIXTURES / "sst_light_x4.pth") in str(err.value)

    path = tmp_path / "SSTlight_X3.pth"
    torch.save({"params_ema": create_model("sst_light", upscaling_factor=3).state_dict()}, path)
    with pytest.raises(ValueError, match=r"\['sst_light', 'sst_light_plus'\]"):
        model_from_checkpoint(path)
    model = model_from_checkpoint(path, preset="sst_light_plus")
    assert model.config.window_sizes == (16, 32, 48, 32, 48, 96) and model.scale == 3
    with pytest.raises(ValueError, match="does not match preset 'sst'.*dim"):
        model_from_checkpoint(path, preset="sst")


def test_bad_files(tmp_path):
    model = tiny_model()
    cases = {
        "garbage.pth": b"definitely not a checkpoint",
        "empty.pth": b"",
    }
    for name, content in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(ValueError, match=f"{name}.*expected an official SST"):
            load_checkpoint(model, tmp_path / name)

    torch.save([1, 2, 3], tmp_path / "list.pth")
    with pytest.raises(ValueError, match="list.pth: holds list"):
        load_checkpoint(model, tmp_path / "list.pth")
    torch.save({"params_ema": {"proj.weight": 3}}, tmp_path / "nontensor.pth")
    with pytest.raises(ValueError, match="'proj.weight' is a int, not a tensor"):
        load_checkpoint(model, tmp_path / "nontensor.pth")
    torch.save({"params_ema": torch.nn.Linear(2, 2)}, tmp_path / "pickled_module.pth")
    with pytest.raises(ValueError, match="weights_only"):
        load_checkpoint(model, tmp_path / "pickled_module.pth")
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        load_checkpoint(model, tmp_path / "missing.pth")

    good = tmp_path / "good.safetensors"
    save_checkpoint(model, good)
    (tmp_path / "truncated.safetensors").write_bytes(good.read_bytes()[:-100])
    with pytest.raises(ValueError, match="truncated.safetensors: unreadable safetensors"):
        load_checkpoint(model, tmp_path / "truncated.safetensors")
    tensors = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(tensors, tmp_path / "foreign.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="format is 'pt', expected 'rfsr.sst'"):
        load_checkpoint(model, tmp_path / "foreign.safetensors")
    meta = read_checkpoint(good)[1]
    save_file(tensors, tmp_path / "future.safetensors", metadata={**meta, "format_version": "9"})
    with pytest.raises(ValueError, match="format version '9'"):
        load_checkpoint(model, tmp_path / "future.safetensors")
    save_file(tensors, tmp_path / "badcfg.safetensors", metadata={**meta, "config": "{\"dim\": 1}"})
    with pytest.raises(ValueError, match="badcfg.safetensors: metadata 'config' is not a valid SSTConfig"):
        model_from_checkpoint(tmp_path / "badcfg.safetensors")
    save_file(tensors, tmp_path / "bare.safetensors")  # a bare state dict loads; it cannot build a model alone
    load_checkpoint(model, tmp_path / "bare.safetensors")
    with pytest.raises(ValueError, match="window sizes"):
        model_from_checkpoint(tmp_path / "bare.safetensors")

    torch.save({"params_ema": {"fc.weight": torch.zeros(2)}}, tmp_path / "other_arch.pth")
    with pytest.raises(ValueError, match="not an SST checkpoint"):
        model_from_checkpoint(tmp_path / "other_arch.pth")


def test_checkpoint_that_does_not_fit(tmp_path):
    model = SST(**fixture_kwargs("sst_base_x2"))
    with pytest.raises(ValueError, match=r"sst_light_x4.pth: does not fit this SST: shape mismatches \(\d+\): "
                                         r"\['proj.weight: file \[24, 3, 3, 3\] vs model \[36, 3, 3, 3\]"):
        load_checkpoint(model, FIXTURES / "sst_light_x4.pth")
    sd = fixture_sd("sst_base_x2")
    del sd["body.1.2.attn.to_q"]
    sd["extra.weight"] = torch.zeros(1)
    torch.save(sd, tmp_path / "partial.pth")
    with pytest.raises(ValueError, match=r"missing keys \(1\): \['body.1.2.attn.to_q'\].*unexpected keys \(1\)"):
        load_checkpoint(model, tmp_path / "partial.pth")
    missing, unexpected = load_checkpoint(model, tmp_path / "partial.pth", strict=False)
    assert missing == ["body.1.2.attn.to_q"] and unexpected == ["extra.weight"]


def test_saved_file_has_a_normal_mode(tmp_path):
    import stat
    from rfsr_cuda.models import SST, save_checkpoint
    model = SST(dim=12, window_sizes=[4], num_heads=[2], ranks=[2], n_blocks=1, rib_hidden_dim=8, rib_n_freqs=2,
                upscaling_factor=2, upsampler_type="pixelshuffle_direct")
    umask = os.umask(0o022)
    try:
        save_checkpoint(model, tmp_path / "m.safetensors")
    finally:
        os.umask(umask)
    assert stat.S_IMODE((tmp_path / "m.safetensors").stat().st_mode) == 0o644
