"""SST against the strong official fixtures (tests/fixtures/official_sst_strong): same function as the official
network, attention included.

The fixtures' RIB parameters and attention 1×1 convs were scaled up before the official forward, so the positional
bias moves the output by 2e-2..3e-1 (see manifest.json). Each comparison is therefore paired with a sensitivity
check: a model with the RIB factors zeroed, with RIB's to_q/to_k swapped, with the token order inside windows
transposed, without RIB's 1/√R, with the q and k blocks of to_qkv swapped, with q/k/v split into heads as (c heads)
instead of (heads c), or (where layers shift) without the shift must miss the expected output by far more than the
1e-4 tolerance, so the equality cannot pass while the attention is wrong.
"""
import json
from pathlib import Path

import numpy as np
import pytest
import torch

import rfsr_cuda.nn.rib as rib_mod
from rfsr_cuda.models import SST, load_checkpoint, model_from_checkpoint
from rfsr_cuda.nn import RIBWindowAttention

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "official_sst_strong"
MANIFEST = json.loads((FIXTURES / "manifest.json").read_text())
CASES = MANIFEST["cases"]
CASE_IDS = [c["io"] for c in CASES]
TOL = 1e-4  # max abs diff allowed against the official float32 output
SENSITIVE = 1e-3  # a broken variant must miss the expected output by more than this


def build(case, backend="reference"):
    cfg = json.loads((FIXTURES / f"{case['checkpoint']}.json").read_text())
    model = SST(**{**cfg, "upscaling_factor": case["scale"]}, attn_backend=backend).eval()
    missing, unexpected = load_checkpoint(model, FIXTURES / f"{case['checkpoint']}.pth")
    assert missing == [] and unexpected == []
    return model


def io(case):
    data = np.load(FIXTURES / f"{case['io']}.npz")
    return torch.from_numpy(data["input"]), torch.from_numpy(data["output"])


def max_diff(model, case):
    x, expected = io(case)
    with torch.no_grad():
        out = model(x)
    assert out.shape == expected.shape == (x.shape[0], 3, x.shape[2] * case["scale"], x.shape[3] * case["scale"])
    return (out - expected).abs().max().item()


def attn_layers(model):
    return [m for m in model.modules() if isinstance(m, RIBWindowAttention)]


def test_fixture_set():
    # every feature the fixtures are meant to cover is there
    cfgs = {c["checkpoint"]: json.loads((FIXTURES / f"{c['checkpoint']}.json").read_text()) for c in CASES}
    assert {c["upsampler_type"] for c in cfgs.values()} == {"pixelshuffle", "pixelshuffle_direct", "nn+conv"}
    assert {None, "DWC", "Linear"} == {c["gate_type"] for c in cfgs.values()}
    assert any(len(set(c["window_sizes"])) == 1 for c in cfgs.values())  # shifted layers
    assert any(r % 2 for c in cfgs.values() for r in c["ranks"])
    assert {8, 12, 16} <= {w for c in cfgs.values() for w in c["window_sizes"]}
    assert {2, 3, 4} <= {h for c in cfgs.values() for h in c["num_heads"]}
    resized = [c for c in CASES if c["scale"] != cfgs[c["checkpoint"]]["upscaling_factor"]]
    assert {cfgs[c["checkpoint"]]["upsampler_type"] for c in resized} == {"pixelshuffle", "pixelshuffle_direct"}
    assert all((c["scale"], cfgs[c["checkpoint"]]["upscaling_factor"]) == (2, 3) for c in resized)
    for c in CASES:
        x, _ = io(c)
        ws = cfgs[c["checkpoint"]]["window_sizes"]
        assert all(x.shape[-2] % w and x.shape[-1] % w for w in ws)  # every layer pads, both sides
        assert min(c["official_sensitivity"].values()) > 5e-3 and c["official_sensitivity"]["no_bias"] >= 1e-2


@pytest.mark.parametrize("ckpt", sorted({c["checkpoint"] for c in CASES}))
def test_model_from_checkpoint_infers_config(ckpt):
    # an official file records everything but the window sizes (and, for a one-stage 'nn+conv', the scale)
    cfg = json.loads((FIXTURES / f"{ckpt}.json").read_text())
    extra = {"upscaling_factor": cfg["upscaling_factor"]} if cfg["upsampler_type"] == "nn+conv" else {}
    model = model_from_checkpoint(FIXTURES / f"{ckpt}.pth", window_sizes=cfg["window_sizes"], **extra)
    got = model.config.to_dict()
    for k, v in cfg.items():
        if k == "intermediate_dim" and cfg["upsampler_type"] == "pixelshuffle_direct":
            continue  # unused by this upsampler, so not in the file
        assert got[k] == v, k


@pytest.mark.parametrize("backend", ["reference", "fused", "concat"])
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_matches_official_strong(case, backend, record_property):
    d = max_diff(build(case, backend), case)
    record_property("max_abs_diff", d)
    assert d <= TOL, f"{case['io']} [{backend}]: max abs diff {d:.3e} > {TOL}"


def _zero_bias(model, monkeypatch):
    for a in attn_layers(model):
        a.to_q.data.zero_()


def _swap_qk(model, monkeypatch):
    for a in attn_layers(model):
        q = a.to_q.data.clone()
        a.to_q.data.copy_(a.to_k.data)
        a.to_k.data.copy_(q)


def _transposed_tokens(model, monkeypatch):
    # token n = col·Wh + row instead of row·Ww + col (all fixture windows are square)
    orig = rib_mod.rib_features

    def transposed(window_size, n_freqs=10):
        f = orig(window_size, n_freqs)
        w = rib_mod._pair(window_size)[0]
        n = torch.arange(w * w)
        return f[(n % w) * w + n // w]

    monkeypatch.setattr(rib_mod, "rib_features", transposed)


def _no_rsqrt_rank(model, monkeypatch):
    for a in attn_layers(model):
        a.rank = 1  # only read for RIB's R**-0.5 factor


def _swap_qk_content(model, monkeypatch):
    # the q and k blocks of to_qkv exchanged: q·kᵀ read with the roles of the content projections swapped
    for a in attn_layers(model):
        c = a.dim
        for t in (a.to_qkv.weight.data, a.to_qkv.bias.data):
            q = t[:c].clone()
            t[:c] = t[c:2 * c]
            t[c:2 * c] = q


def _heads_split_transposed(model, monkeypatch):
    # channels of q, k, v split as (c heads) instead of (heads c)
    for a in attn_layers(model):
        h, d = a.num_heads, a.head_dim
        j = torch.arange(h * d)
        perm = (j % d) * h + j // d
        perm = torch.cat([perm + i * h * d for i in range(3)])
        a.to_qkv.weight.data.copy_(a.to_qkv.weight.data[perm])
        a.to_qkv.bias.data.copy_(a.to_qkv.bias.data[perm])


def _no_shift(model, monkeypatch):
    layers = attn_layers(model)
    assert any(a.shift for a in layers)
    for a in layers:
        a.shift = False


VARIANTS = {"no_bias": _zero_bias, "swap_qk": _swap_qk, "transposed_tokens": _transposed_tokens,
            "no_rsqrt_R": _no_rsqrt_rank, "swap_qk_content": _swap_qk_content,
            "heads_split_transposed": _heads_split_transposed, "no_shift": _no_shift}


def _shifts(case):
    ws = json.loads((FIXTURES / f"{case['checkpoint']}.json").read_text())["window_sizes"]
    return len(ws) > 1 and len(set(ws)) == 1


SENSITIVITY_CASES = [pytest.param(c, v, id=f"{c['io']}-{v}") for c in CASES for v in VARIANTS
                     if v != "no_shift" or _shifts(c)]


@pytest.mark.parametrize("case, variant", SENSITIVITY_CASES)
def test_fixture_is_sensitive(case, variant, monkeypatch, record_property):
    model = build(case)
    VARIANTS[variant](model, monkeypatch)
    d = max_diff(model, case)
    record_property("max_abs_diff", d)
    assert d > SENSITIVE, f"{case['io']}: the {variant} model is within {d:.3e} of the expected output"
