"""SST against the official network's fixtures, official keys and keywords, init, config errors and the cache."""
import json
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch

from rfsr_cuda.models import SST, SSTConfig, load_checkpoint
from rfsr_cuda.nn import RIB, RIBWindowAttention

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "official_sst"
# (checkpoint, io file, scale of the model it is loaded into); the last one is the x4 checkpoint in a x2 model,
# whose up_conv the loader resizes as the official loader does
FIXTURE_CASES = [("sst_base_x2", "sst_base_x2_io", 2), ("sst_light_x4", "sst_light_x4_io", 4),
                 ("sst_light_x4", "sst_light_x4_as_x2_io", 2)]


def official_kwargs(name):
    return json.loads((FIXTURES / f"{name}.json").read_text())


def official_state_dict(name):
    return torch.load(FIXTURES / f"{name}.pth", weights_only=True)["params_ema"]


def tiny(**kw):
    args = dict(dim=12, window_sizes=[4, 8], num_heads=[3, 2], ranks=[4, 6], n_blocks=2, exp_ratio=1.5,
                rib_hidden_dim=8, rib_n_freqs=3, gate_type="DWC", upscaling_factor=2)
    args.update(kw)
    return args


@pytest.mark.parametrize("backend", ["reference", "fused", "concat"])
@pytest.mark.parametrize("ckpt, io, scale", FIXTURE_CASES)
def test_matches_official_outputs(ckpt, io, scale, backend):
    model = SST(**{**official_kwargs(ckpt), "upscaling_factor": scale}, attn_backend=backend).eval()
    load_checkpoint(model, FIXTURES / f"{ckpt}.pth")
    data = np.load(FIXTURES / f"{io}.npz")
    x = torch.from_numpy(data["input"])
    assert x.shape[-1] % 8 and x.shape[-2] % 8  # not a multiple of any window: every layer pads
    with torch.no_grad():
        out = model(x)
    expected = torch.from_numpy(data["output"])
    assert out.shape == expected.shape == (x.shape[0], 3, x.shape[2] * scale, x.shape[3] * scale)
    assert (out - expected).abs().max().item() <= 1e-4


@pytest.mark.parametrize("ckpt", ["sst_base_x2", "sst_light_x4"])
def test_official_keywords_and_state_dict_keys(ckpt):
    kwargs = official_kwargs(ckpt)
    model = SST(**kwargs)
    for k, v in kwargs.items():
        got = getattr(model.config, k)
        assert (list(got) if isinstance(got, tuple) else got) == v, k
    official = official_state_dict(ckpt)
    ours = model.state_dict()
    assert list(ours) == list(official)  # same names, same order
    assert {k: tuple(v.shape) for k, v in ours.items()} == {k: tuple(v.shape) for k, v in official.items()}
    assert dict(model.named_parameters()).keys() == ours.keys()  # no buffers: features are not state


def test_official_init():
    torch.manual_seed(0)
    model = SST(**tiny(dim=96, num_heads=[4, 4], ranks=[16, 16], rib_hidden_dim=32, rib_n_freqs=10,
                       upsampler_type="pixelshuffle"))
    attn = model.body[0][0].attn
    for conv in (attn.to_qkv, attn.to_out, model.body[0][0].ffn.proj, attn.gate[1]):
        assert abs(conv.weight.std().item() - 0.02) < 0.002 and conv.weight.abs().max() <= 2.0
    for m in model.modules():
        if isinstance(m, torch.nn.Conv2d):
            assert torch.count_nonzero(m.bias) == 0
            if m.kernel_size == (3, 3):  # PyTorch's default init: U(±1/√fan_in)
                fan_in = m.weight[0].numel()
                assert m.weight.abs().max() <= fan_in ** -0.5 and m.weight.std() > 0.3 * fan_in ** -0.5
    assert abs(attn.to_q.std().item() - 0.05) < 0.005 and torch.count_nonzero(attn.hidden_b) == 0
    assert torch.equal(model.body[2].weight, torch.ones(96)) and torch.count_nonzero(model.body[2].bias) == 0


def test_set_attn_backend_switches_every_layer():
    model = SST(**tiny())
    assert model.set_attn_backend("concat") is model
    backends = {m.attn_backend for m in model.modules() if isinstance(m, RIBWindowAttention)}
    assert backends == {"concat"} and model.config.attn_backend == "concat"
    with pytest.raises(ValueError, match="attn_backend"):
        model.set_attn_backend("sdpa")


def test_from_config_and_json_round_trip():
    cfg = SSTConfig(**tiny(num_heads=3, ranks=4))
    assert cfg.num_heads == (3, 3) and cfg.ranks == (4, 4)
    assert SSTConfig.from_json(cfg.to_json()) == cfg
    model = SST.from_config(cfg, attn_backend="reference")
    assert model.config == cfg.replace(attn_backend="reference")
    with pytest.raises(TypeError, match="SSTConfig"):
        SST.from_config(tiny())


@pytest.mark.parametrize("kw, error, match", [
    (dict(num_heads=[3]), ValueError, "num_heads"),
    (dict(ranks=[4, 4, 4]), ValueError, "ranks"),
    (dict(ranks=None), ValueError, "ranks"),
    (dict(dim=10), ValueError, "divisible"),
    (dict(attn_type="Flex"), ValueError, "attn_type"),
    (dict(upsampler_type="deconv"), ValueError, "upsampler_type"),
    (dict(gate_type="SE"), ValueError, "gate_type"),
    (dict(attn_backend="flash"), ValueError, "attn_backend"),
    (dict(window_sizes=[]), TypeError, "window_sizes"),
    (dict(window_sizes=[4, 0]), ValueError, "window_sizes"),
    (dict(n_blocks=0), ValueError, "n_blocks"),
    (dict(exp_ratio=0.01), ValueError, "exp_ratio"),
    (dict(upscaling_factor=2.0), ValueError, "upscaling_factor"),
    (dict(upsampler_type="nn+conv", upscaling_factor=5), ValueError, "power of 2 or 3"),
    (dict(bogus=1), TypeError, "bogus"),
])
def test_bad_config(kw, error, match):
    with pytest.raises(error, match=match):
        SST(**tiny(**kw))


def test_input_checks():
    model = SST(**tiny(window_sizes=[4, 16]))
    assert model.min_input_size == 9
    with pytest.raises(ValueError, match=">= 9"):
        model(torch.rand(1, 3, 8, 30))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        model(torch.rand(1, 4, 20, 20))
    assert model(torch.rand(1, 3, 9, 11)).shape == (1, 3, 18, 22)


def test_model_cache_one_check_per_forward_and_data_edits():
    torch.manual_seed(0)
    model = SST(**tiny()).eval()
    with torch.no_grad():  # stronger attention than the init's, so a RIB edit visibly moves the output
        for name, p in model.named_parameters():
            if ".attn." in name and "gate" not in name:
                p.normal_(std=0.3)
    x = torch.rand(1, 3, 11, 13)
    n_layers = 4
    with mock.patch.object(RIB, "_compute_factors", autospec=True, side_effect=RIB._compute_factors) as mlp, \
            torch.no_grad():
        first = model(x)
        with mock.patch("torch.equal", wraps=torch.equal) as equal:
            second = model(x)
        assert mlp.call_count == n_layers and equal.call_count == 1
        assert torch.equal(first, second)
        # an EMA-style edit through .data in one layer: only that layer recomputes, and the output follows
        model.body[1][1].attn.to_k.data.mul_(-2.0)
        edited = model(x)
        assert mlp.call_count == n_layers + 1
        model.train()  # training mode: no cache, factors straight from the parameters
        fresh = model(x)
    assert not torch.allclose(edited, first, atol=1e-5)
    torch.testing.assert_close(edited, fresh, rtol=0, atol=0)


def test_compiles_as_one_graph():
    # under torch.compile the cache is bypassed (factors are recomputed inside the graph)
    torch.manual_seed(0)
    model = SST(**tiny(n_blocks=1)).eval()
    x = torch.rand(1, 3, 11, 13)
    with torch.no_grad():
        expected = model(x)  # fills the eager cache first: compiling must not trip over it
        compiled = torch.compile(model, backend="eager", fullgraph=True)
        torch.testing.assert_close(compiled(x), expected, rtol=0, atol=1e-6)
