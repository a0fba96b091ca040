"""RIB factors against the formula written out by hand, and the inference cache: reuse and invalidation (every
rule of the rfsr_cuda.nn.rib docstring), checked without reading parameter values."""
import contextlib
import math
from unittest import mock

import pytest
import torch

from rfsr_cuda.nn import RIB, clear_rib_caches, rib_features


def hand_features(wh, ww, n_freqs):
    """Float64, token by token: [x, y] then (sin x, sin y, cos x, cos y) at 2^i, i = 0..F-1; row-major tokens."""
    rows = []
    for r in range(wh):
        for c in range(ww):
            x, y = 2 * (c + 0.5) / ww - 1, 2 * (r + 0.5) / wh - 1
            feats = [x, y]
            for i in range(n_freqs):
                feats += [math.sin(2 ** i * x), math.sin(2 ** i * y), math.cos(2 ** i * x), math.cos(2 ** i * y)]
            rows.append(feats)
    return torch.tensor(rows, dtype=torch.float64)


def hand_factors(rib, window=None):
    wh, ww = window or rib.window_size
    feats = hand_features(wh, ww, rib.rib_n_freqs)
    hidden = torch.relu(feats @ rib.to_hidden.detach().double() + rib.hidden_b.detach().double())
    q_p = torch.einsum("nd,hdr->hnr", hidden, rib.to_q.detach().double())
    k_p = torch.einsum("nd,hdr->hnr", hidden, rib.to_k.detach().double())
    return q_p / math.sqrt(rib.rank), k_p


def make_rib(**kw):
    torch.manual_seed(0)
    args = dict(num_heads=3, rank=5, window_size=4, hidden_dim=8, n_freqs=3)
    args.update(kw)
    rib = RIB(**args)
    with torch.no_grad():
        rib.hidden_b.normal_(std=0.1)  # non-zero so its gradient and edits matter
    return rib


@pytest.fixture
def count_mlp():
    with mock.patch.object(RIB, "_compute_factors", autospec=True, side_effect=RIB._compute_factors) as spy:
        yield spy


def test_features_layout():
    f = rib_features((2, 3), n_freqs=1)
    assert f.shape == (6, 6) and f.dtype == torch.float32
    # token 1 = row 0, col 1: x = 2·1.5/3 − 1 = 0, y = 2·0.5/2 − 1 = −0.5
    expected = [0.0, -0.5, 0.0, math.sin(-0.5), 1.0, math.cos(-0.5)]
    torch.testing.assert_close(f[1], torch.tensor(expected), rtol=0, atol=1e-7)
    torch.testing.assert_close(f.double(), hand_features(2, 3, 1), rtol=0, atol=1e-6)
    assert rib_features(4, n_freqs=10).shape == (16, 42)


@pytest.mark.parametrize("window", [4, (3, 5)])
def test_factors_match_hand_formula(window):
    rib = make_rib(window_size=window)
    bias_q, bias_k = rib.factors()
    ref_q, ref_k = hand_factors(rib)
    assert bias_q.shape == (3, ref_q.shape[1], 5) and bias_q.dtype == torch.float32 and bias_q.is_contiguous()
    torch.testing.assert_close(bias_q.double(), ref_q, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(bias_k.double(), ref_k, rtol=1e-5, atol=1e-6)
    # the bias the attention adds is Q_p K_pᵀ / √R
    torch.testing.assert_close((bias_q @ bias_k.transpose(1, 2)).double(), ref_q @ ref_k.transpose(1, 2),
                               rtol=1e-5, atol=1e-6)


def test_float64_module_computes_in_float64():
    rib = make_rib().double()
    bias_q, _ = rib.factors()
    assert bias_q.dtype == torch.float64
    # the features stay float32 (the values the official weights were trained on); the MLP runs in float64
    torch.testing.assert_close(bias_q, hand_factors(rib)[0], rtol=0, atol=1e-8)


def test_official_init():
    torch.manual_seed(0)
    rib = RIB(num_heads=6, rank=32, window_size=8, hidden_dim=32, n_freqs=10)
    assert rib.to_hidden.shape == (42, 32) and rib.hidden_b.shape == (1, 32)
    assert rib.to_q.shape == rib.to_k.shape == (6, 32, 32)
    assert torch.count_nonzero(rib.hidden_b) == 0
    for p in (rib.to_hidden, rib.to_q, rib.to_k):
        assert abs(p.std().item() - 0.05) < 0.005 and abs(p.mean().item()) < 0.005


def test_cache_reused_in_eval(count_mlp):
    rib = make_rib().eval()
    with torch.no_grad():
        first = rib.factors()
        second = rib.factors()
    assert count_mlp.call_count == 1
    assert second[0] is first[0] and second[1] is first[1]
    with torch.inference_mode():
        third = rib.factors()
    assert third[0] is first[0] and count_mlp.call_count == 1


def test_cache_keyed_by_window_and_dtype(count_mlp):
    rib = make_rib().eval()
    with torch.no_grad():
        f32 = rib.factors()
        bf16 = rib.factors(dtype=torch.bfloat16)
        other = rib.factors(window_size=(2, 6))
        assert count_mlp.call_count == 3
        assert rib.factors(dtype=torch.bfloat16)[0] is bf16[0] and rib.factors()[0] is f32[0]
        assert rib.factors(window_size=(2, 6))[1] is other[1]
    assert count_mlp.call_count == 3
    assert bf16[0].dtype == torch.bfloat16 and other[0].shape == (3, 12, 5)
    torch.testing.assert_close(bf16[0].float(), f32[0], rtol=1e-2, atol=1e-3)
    torch.testing.assert_close(other[0].double(), hand_factors(rib, (2, 6))[0], rtol=1e-5, atol=1e-6)


def assert_fresh(rib, factors):
    ref_q, ref_k = hand_factors(rib)
    torch.testing.assert_close(factors[0].double(), ref_q, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(factors[1].double(), ref_k, rtol=1e-5, atol=1e-6)


@contextlib.contextmanager
def no_value_reads():
    """Fail on anything that reads tensor values on the host (on CUDA each would be a device sync)."""
    def boom(*args, **kwargs):
        raise AssertionError("the cache read tensor values")

    with mock.patch("torch.equal", boom), mock.patch.object(torch.Tensor, "item", boom), \
            mock.patch.object(torch.Tensor, "__bool__", boom), mock.patch.object(torch.Tensor, "tolist", boom):
        yield


def factors(rib, **kwargs):
    """``rib.factors(**kwargs)``, failing if the cache logic reads any tensor value."""
    with no_value_reads():
        return rib.factors(**kwargs)


@pytest.mark.parametrize("name", ["to_hidden", "hidden_b", "to_q", "to_k"])
@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
def test_cache_invalidated_by_in_place_edit(name, mode, count_mlp):
    # in-place ops bump the version counter, also under no_grad / inference_mode (EMA updates, copy_)
    rib = make_rib().eval()
    ctx = torch.no_grad if mode == "no_grad" else torch.inference_mode
    with ctx():
        old = factors(rib)
        getattr(rib, name).add_(0.05)
        new = factors(rib)
    assert count_mlp.call_count == 2
    assert not (torch.equal(new[0], old[0]) and torch.equal(new[1], old[1]))
    assert_fresh(rib, new)


@pytest.mark.parametrize("name", ["to_hidden", "to_k"])
def test_data_edit_needs_clear(name, count_mlp):
    # documented limit: .data is an alias with its own version counter, so such edits need clear_rib_caches
    model = torch.nn.Sequential(make_rib(), make_rib(rank=3)).eval()
    rib = model[0]
    with torch.no_grad():
        old = factors(rib)
        getattr(rib, name).data.mul_(-1.5)
        assert factors(rib)[0] is old[0]  # not seen
        assert clear_rib_caches(model) is model
        new = factors(rib)
    assert count_mlp.call_count == 2
    assert_fresh(rib, new)


@pytest.mark.parametrize("make_opt", [
    lambda ps: torch.optim.AdamW(ps, lr=0.01),
    lambda ps: torch.optim.AdamW(ps, lr=0.01, foreach=True),
    lambda ps: torch.optim.AdamW(ps, lr=0.01, fused=True),  # writes without bumping version counters
    lambda ps: torch.optim.SGD(ps, lr=0.01, foreach=False),
], ids=["adamw", "adamw_foreach", "adamw_fused", "sgd"])
def test_cache_invalidated_by_optimizer_step(make_opt, count_mlp):
    rib = make_rib().eval()
    with torch.no_grad():
        old_q, _ = factors(rib)
    opt = make_opt(list(rib.parameters()))
    for p in rib.parameters():
        p.grad = torch.ones_like(p)
    opt.step()
    with torch.no_grad():
        new = factors(rib)
        assert factors(rib)[0] is new[0]  # and cached again
    assert count_mlp.call_count == 2 and not torch.equal(new[0], old_q)
    assert_fresh(rib, new)


@pytest.mark.parametrize("assign", [False, True])
def test_cache_invalidated_by_load_state_dict(assign, count_mlp):
    rib = make_rib().eval()
    other = make_rib()
    with torch.no_grad():
        other.to_q.mul_(2.0)
        factors(rib)
        rib.load_state_dict(other.state_dict(), assign=assign)  # copy_ bumps versions; assign swaps tensors
        new = factors(rib)
    assert count_mlp.call_count == 2
    torch.testing.assert_close(new[0].double(), hand_factors(other)[0], rtol=1e-5, atol=1e-6)


def test_cache_invalidated_by_replaced_tensors(count_mlp):
    rib = make_rib().eval()
    with torch.no_grad():
        factors(rib)
        # a new Parameter at (possibly) the freed address of the old one, version 0 again: the cache keeps the old
        # tensor alive, so the address cannot repeat
        rib.to_q = torch.nn.Parameter(torch.randn_like(rib.to_q))
        first = factors(rib)
        rib.to_k.data = torch.randn_like(rib.to_k)  # swaps the tensor under the same Parameter
        second = factors(rib)
    assert count_mlp.call_count == 3
    assert_fresh(rib, second)
    assert not torch.equal(first[1], second[1])


def test_cache_follows_to(count_mlp):
    rib = make_rib().eval()
    with torch.no_grad():
        factors(rib)
        rib.double()
        assert not rib._factors  # .to()/.double() drop the entries (and the old tensors) at once
        got = factors(rib)
    assert got[0].dtype == torch.float64 and count_mlp.call_count == 2
    torch.testing.assert_close(got[0], hand_factors(rib)[0], rtol=0, atol=1e-8)


def test_cache_invalidated_by_ema_update(count_mlp):
    # as rfsr_cuda.train.loop.ModelEMA does it: lerp_ of the averaged copy's parameters under no_grad
    ema, model = make_rib().eval().requires_grad_(False), make_rib(hidden_dim=8)
    with torch.no_grad():
        model.to_hidden.normal_(std=0.3)
    before = factors(ema)  # no gradient wanted: cached even with grad mode on
    assert factors(ema)[0] is before[0]
    with torch.no_grad():
        for e, p in zip(ema.parameters(), model.parameters()):
            e.lerp_(p, 0.5)
        torch._foreach_lerp_(list(ema.parameters()), list(model.parameters()), 0.5)
    after = factors(ema)
    assert count_mlp.call_count == 2 and not torch.equal(after[0], before[0])
    assert_fresh(ema, after)


def test_inference_tensor_parameters_are_not_cached(count_mlp):
    with torch.inference_mode():  # a model built here has inference-tensor parameters: no version counter
        rib = make_rib().eval()
        a = factors(rib)
        rib.to_q.mul_(2.0)
        b = factors(rib)
    assert count_mlp.call_count == 2
    assert_fresh(rib, b)
    assert not torch.equal(a[0], b[0])


def test_training_recomputes_and_gradients_flow(count_mlp):
    rib = make_rib().train()
    a = factors(rib)
    b = factors(rib)
    assert count_mlp.call_count == 2 and a[0] is not b[0]
    (a[0].square().sum() + a[1].sum()).backward()
    for name, p in rib.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_eval_with_grad_recomputes_so_gradients_flow(count_mlp):
    rib = make_rib().eval()
    with torch.no_grad():
        factors(rib)
    bias_q, _ = factors(rib)  # grad mode on, parameters require grad: the cache must not cut the graph
    assert count_mlp.call_count == 2 and bias_q.requires_grad
    bias_q.sum().backward()
    assert rib.to_q.grad.abs().sum() > 0 and rib.to_hidden.grad.abs().sum() > 0


def test_train_mode_drops_cache():
    rib = make_rib().eval()
    with torch.no_grad():
        factors(rib)
    assert rib._factors and rib._pinned
    rib.train()
    assert not rib._factors and rib._stamp is None and not rib._pinned


def test_many_ribs_hit_without_reading_values(count_mlp):
    ribs = torch.nn.ModuleList([make_rib(), make_rib(rank=3, window_size=(2, 5)), make_rib(n_freqs=2)]).eval()
    with torch.no_grad():
        first = [factors(r) for r in ribs]
        for _ in range(3):
            assert all(factors(r)[0] is f[0] for r, f in zip(ribs, first))
        assert count_mlp.call_count == 3
        ribs[1].to_k.mul_(-1.0)
        got = [factors(r) for r in ribs]
    assert count_mlp.call_count == 4  # only the edited layer recomputes
    assert got[0][0] is first[0][0] and got[2][1] is first[2][1]
    for r, f in zip(ribs, got):
        assert_fresh(r, f)


@pytest.mark.parametrize("kw, match", [
    (dict(num_heads=0), "num_heads"), (dict(rank=0), "rank"), (dict(window_size=(0, 4)), "window_size"),
    (dict(window_size="8"), "window_size"), (dict(hidden_dim=0), "rib_hidden_dim"),
    (dict(n_freqs=-1), "rib_n_freqs"), (dict(rank=2.0), "rank"),
])
def test_bad_arguments(kw, match):
    args = dict(num_heads=2, rank=4, window_size=4)
    args.update(kw)
    with pytest.raises(ValueError, match=match):
        RIB(**args)


def test_factors_stay_float32_under_autocast():
    rib = make_rib()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bias_q, bias_k = rib.factors()
    assert bias_q.dtype == torch.float32
    torch.testing.assert_close(bias_q.double(), hand_factors(rib)[0], rtol=1e-5, atol=1e-6)


def test_first_forward_under_inference_mode_then_training():
    # the cached window features must not become inference tensors that training cannot save for backward
    from rfsr_cuda.models import SST
    model = SST(dim=12, window_sizes=[4, 8], num_heads=[2, 2], ranks=[4, 4], n_blocks=1, rib_hidden_dim=8,
                rib_n_freqs=2, upscaling_factor=2, upsampler_type="pixelshuffle_direct").eval()
    x = torch.rand(1, 3, 16, 16)
    with torch.inference_mode():
        before = model(x)
    model.train()
    model(x).mean().backward()
    assert model.body[0][0].attn.to_q.grad is not None and model.body[0][0].attn.to_q.grad.abs().sum() > 0
    model.eval()
    with torch.inference_mode():
        torch.testing.assert_close(model(x), before)
