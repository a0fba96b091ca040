"""Presets: the official hyper-parameters (parameter counts of paper-notes §3), and every preset runs."""
import pytest
import torch

from rfsr_cuda.models import OFFICIAL_NAMES, PRESETS, SST, create_model, get_config, list_models

# Parameter counts at x2 / x3 / x4, computed from the official code (README cross-checks SST-XL+: 33.9/34.3/34.9 M).
PARAMS = {
    "sst_light": (893_340, 899_835, 908_928),
    "sst": (11_676_707, 11_861_347, 12_119_843),
    "sst_large": (20_314_947, 20_730_147, 21_311_427),
    "sst_xl_plus": (33_892_195, 34_307_395, 34_888_675),
}
PARAMS.update({"sst_light_plus": PARAMS["sst_light"], "sst_plus": PARAMS["sst"],
               "sst_large_plus": PARAMS["sst_large"], "sst_xl": PARAMS["sst_xl_plus"]})
TENSORS = {"sst_light": 678, "sst": 816, "sst_large": 1084, "sst_xl": 1352}


def test_list_models():
    assert list_models() == sorted(PARAMS)
    assert set(OFFICIAL_NAMES) == set(PARAMS) - {"sst_xl"}  # XL was released only as XL+


@pytest.mark.parametrize("name", sorted(PARAMS))
def test_parameter_counts(name):
    for scale, expected in zip((2, 3, 4), PARAMS[name]):
        with torch.device("meta"):
            model = create_model(name, upscaling_factor=scale)
        assert sum(p.numel() for p in model.parameters()) == expected, (name, scale)
    assert len(model.state_dict()) == TENSORS[name.replace("_plus", "")]


def test_window_sets():
    assert get_config("sst_light").window_sizes == (8, 16, 32, 16, 32, 64)
    assert get_config("sst_large").window_sizes == (16, 32, 64, 16, 32, 64)
    for name in ("sst_light_plus", "sst_plus", "sst_large_plus", "sst_xl_plus"):
        assert get_config(name).window_sizes == (16, 32, 48, 32, 48, 96)
    cfg = get_config("sst")
    assert (cfg.dim, cfg.num_heads, cfg.ranks, cfg.n_blocks, cfg.exp_ratio, cfg.intermediate_dim) == \
        (180, (6,) * 6, (18, 18, 18, 34, 34, 34), 6, 1.25, 64)


@pytest.mark.parametrize("name", sorted(PARAMS))
def test_every_preset_trains_when_shrunk(name):
    # the preset's widths, heads, ranks and upsampler; one block and windows / 8 to keep it fast
    cfg = PRESETS[name]
    torch.manual_seed(0)
    model = create_model(name, n_blocks=1, window_sizes=[w // 8 for w in cfg.window_sizes], upscaling_factor=3)
    x = torch.rand(1, 3, 13, 14)
    out = model(x)
    assert out.shape == (1, 3, 39, 42) and torch.isfinite(out).all()
    out.square().mean().backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert no_grad == []


def test_create_model_errors():
    with pytest.raises(ValueError, match="sst_light_plus"):
        create_model("sst_tiny")
    with pytest.raises(TypeError, match="windows"):
        create_model("sst", windows=[8])
    with pytest.raises(ValueError, match="num_heads must have one entry per window size"):
        create_model("sst", window_sizes=[8, 16])  # per-layer lists must be overridden together
    model = create_model("sst_light", attn_backend="reference", upscaling_factor=4)
    assert isinstance(model, SST) and model.scale == 4 and model.config.attn_backend == "reference"
