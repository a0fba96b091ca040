"""RIBWindowAttention against a float64 window-by-window implementation, and the three backends against each other."""
import math
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from rfsr_cuda.nn import RIBWindowAttention, op_dtype, set_attn_backend
from rfsr_cuda.nn import attention as attention_mod

from test_rib import hand_factors


def naive_attention_layer(attn, x):
    """The layer written out in float64 with a loop over windows (pad, shift, attend, unshift, crop, gate, out)."""
    p = {k: v.detach().double() for k, v in attn.state_dict().items()}
    x = x.detach().double()
    B, C, H, W = x.shape
    wh, ww = attn.window_size
    heads, D = attn.num_heads, C // attn.num_heads
    gate = None
    if attn.gate_type == "DWC":
        gate = torch.sigmoid(F.conv2d(F.conv2d(x, p["gate.0.weight"], p["gate.0.bias"], padding=1, groups=C),
                                      p["gate.1.weight"], p["gate.1.bias"]))
    elif attn.gate_type == "Linear":
        gate = torch.sigmoid(F.conv2d(x, p["gate.0.weight"], p["gate.0.bias"]))
    x = F.pad(x, (0, -W % ww, 0, -H % wh), mode="reflect")
    if attn.shift:
        x = torch.roll(x, (-(wh // 2), -(ww // 2)), dims=(2, 3))
    q, k, v = F.conv2d(x, p["to_qkv.weight"], p["to_qkv.bias"]).chunk(3, dim=1)  # channels (heads, D) each
    bias_q, bias_k = hand_factors(attn)
    out = torch.zeros_like(q)
    for b in range(B):
        for i in range(0, x.shape[2], wh):
            for j in range(0, x.shape[3], ww):
                def win(t):  # (heads, wh·ww, D), tokens row-major
                    return t[b, :, i:i + wh, j:j + ww].reshape(heads, D, wh * ww).transpose(1, 2)
                logits = win(q) @ win(k).transpose(1, 2) / math.sqrt(D) + bias_q @ bias_k.transpose(1, 2)
                o = torch.softmax(logits, dim=-1) @ win(v)
                out[b, :, i:i + wh, j:j + ww] = o.transpose(1, 2).reshape(C, wh, ww)
    if attn.shift:
        out = torch.roll(out, (wh // 2, ww // 2), dims=(2, 3))
    out = out[:, :, :H, :W]
    if gate is not None:
        out = out * gate
    return F.conv2d(out, p["to_out.weight"], p["to_out.bias"])


def make_attn(dim=12, window=8, heads=3, rank=4, **kw):
    torch.manual_seed(0)
    attn = RIBWindowAttention(dim, window, heads, rank, rib_hidden_dim=8, rib_n_freqs=3, **kw)
    with torch.no_grad():  # larger random weights than the init so that every part visibly matters
        for name, prm in attn.named_parameters():
            prm.normal_(std=0.3 if name.startswith(("to_q", "to_k", "to_hidden")) else 0.2)
    return attn


CASES = [  # (H, W), window, shift, gate: odd sizes, padding, a window taller than the input, a rectangular window
    ((13, 19), 8, False, "DWC"),
    ((13, 19), 8, True, "DWC"),
    ((11, 9), 16, False, "Linear"),
    ((10, 15), (4, 6), True, None),
]


@pytest.mark.parametrize("size, window, shift, gate", CASES)
def test_matches_window_loop_in_float64(size, window, shift, gate):
    attn = make_attn(window=window, shift=shift, gate_type=gate, attn_backend="reference").double()
    x = torch.randn(2, 12, *size, dtype=torch.float64)
    out = attn(x)
    assert out.shape == x.shape and out.dtype == torch.float64
    # not 1e-12: the RIB features are float32 by design (see test_rib), everything else is float64
    torch.testing.assert_close(out, naive_attention_layer(attn, x), rtol=0, atol=1e-6)


@pytest.mark.parametrize("size, window, shift, gate", CASES)
def test_backends_agree_forward_and_backward(size, window, shift, gate):
    attn = make_attn(window=window, shift=shift, gate_type=gate)
    x = torch.randn(2, 12, *size)
    naive = naive_attention_layer(attn, x)
    results = {}
    for backend in ("reference", "fused", "concat"):
        attn.set_attn_backend(backend)
        attn.zero_grad()
        xg = x.clone().requires_grad_()
        out = attn(xg)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        results[backend] = out, xg.grad, {n: p.grad.clone() for n, p in attn.named_parameters()}
        torch.testing.assert_close(out.double(), naive, rtol=0, atol=2e-5)
    ref_out, ref_dx, ref_grads = results["reference"]
    for backend in ("fused", "concat"):
        out, dx, grads = results[backend]
        torch.testing.assert_close(out, ref_out, rtol=0, atol=2e-5)
        torch.testing.assert_close(dx, ref_dx, rtol=1e-4, atol=1e-4)
        for name, g in grads.items():
            assert g.abs().sum() > 0, name
            torch.testing.assert_close(g, ref_grads[name], rtol=1e-4, atol=1e-4, msg=f"{backend}: {name}")


def test_op_gets_strided_views_and_shared_factors():
    attn = make_attn(window=4)
    seen = {}

    def spy(q, k, v, bias_q, bias_k, scale):
        seen.update(q=q, k=k, v=v, bias_q=bias_q, scale=scale)
        return attention_mod.flash_rfbias_reference(q, k, v, bias_q, bias_k, scale)

    with mock.patch.dict(attention_mod._OPS, {"fused": spy}):
        attn(torch.randn(2, 12, 9, 7))
    q, k, v = seen["q"], seen["k"], seen["v"]
    # 2 images × 3×2 windows of 16 tokens, 3 heads of 4 channels; one partition buffer, q/k/v are views into it
    assert q.shape == (12, 16, 3, 4) and q.stride(-1) == 1 and not q.is_contiguous()
    assert q.untyped_storage().data_ptr() == k.untyped_storage().data_ptr() == v.untyped_storage().data_ptr()
    assert seen["bias_q"].shape == (3, 16, 4)  # (H, N, R), shared by every window, never expanded
    assert seen["scale"] == pytest.approx(4 ** -0.5)


def test_dtype_policy():
    assert op_dtype("fused", "cpu", torch.float32) == torch.float32
    assert op_dtype("fused", "cpu", torch.bfloat16) == torch.bfloat16
    assert op_dtype("fused", "cuda", torch.float32) == torch.bfloat16  # the official model's attention is bf16 too
    assert op_dtype("concat", "cuda", torch.float32) == torch.bfloat16
    assert op_dtype("fused", "cuda", torch.float16) == torch.float16
    assert op_dtype("reference", "cuda", torch.float32) == torch.float32
    assert op_dtype("reference", "cpu", torch.bfloat16) == torch.float32
    assert op_dtype("reference", "cpu", torch.float64) == torch.float64


@pytest.mark.parametrize("backend, expected", [("fused", torch.bfloat16), ("reference", torch.float32)])
def test_bf16_activations(backend, expected):
    attn = make_attn(window=4, attn_backend=backend)
    x = torch.randn(1, 12, 6, 10)
    ref = attn(x)
    attn = attn.to(torch.bfloat16)
    dtypes = []
    real_op = attention_mod._OPS[backend]

    def spy(*args):
        dtypes.append({t.dtype for t in args[:5]})
        return real_op(*args)

    with mock.patch.dict(attention_mod._OPS, {backend: spy}):
        out = attn(x.to(torch.bfloat16))
    assert dtypes == [{expected}] and out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, rtol=0, atol=0.05)


def test_set_attn_backend():
    model = torch.nn.Sequential(make_attn(), make_attn(window=4))
    assert set_attn_backend(model, "concat") is model
    assert [m.attn_backend for m in model] == ["concat", "concat"]
    with pytest.raises(ValueError, match="attn_backend"):
        set_attn_backend(model, "flash")
    with pytest.raises(ValueError, match="attn_backend"):
        model[0].set_attn_backend("sdpa")


@pytest.mark.parametrize("kw, match", [
    (dict(dim=10, heads=3), "divisible"), (dict(gate_type="SE"), "gate_type"), (dict(attn_backend="flex"), "attn_backend"),
    (dict(rank=0), "rank"), (dict(dim=0), "dim"),
])
def test_bad_arguments(kw, match):
    args = dict(dim=12, window=8, heads=3, rank=4)
    extra = {k: kw.pop(k) for k in list(kw) if k not in args}
    args.update(kw)
    with pytest.raises(ValueError, match=match):
        RIBWindowAttention(args["dim"], args["window"], args["heads"], args["rank"], **extra)


def test_bad_inputs():
    attn = make_attn(window=16)
    with pytest.raises(ValueError, match="too small"):
        attn(torch.randn(1, 12, 8, 20))  # padding 8 rows needs more than 8 rows for reflect padding
    with pytest.raises(ValueError, match=r"\(B, 12, H, W\)"):
        attn(torch.randn(1, 8, 20, 20))
    assert attn(torch.randn(1, 12, 9, 20)).shape == (1, 12, 9, 20)  # 9 rows: the smallest that pads to 16


def test_reference_backend_stays_float32_under_autocast():
    attn = make_attn(window=4, attn_backend="reference")
    x = torch.randn(1, 12, 6, 10)
    seen = {}
    real_op = attention_mod._OPS["reference"]

    def spy(q, k, v, bias_q, bias_k, scale):
        out = real_op(q, k, v, bias_q, bias_k, scale)
        with torch.autocast("cpu", enabled=False):
            exact = real_op(q, k, v, bias_q, bias_k, scale)
        seen.update(q=q.dtype, bias=bias_q.dtype, exact=torch.equal(out, exact))
        return out

    with mock.patch.dict(attention_mod._OPS, {"reference": spy}), torch.autocast("cpu", dtype=torch.bfloat16):
        attn(x)
    # the q/k/v GEMM ran in bf16 under autocast; the oracle's own matmuls did not
    assert seen == {"q": torch.float32, "bias": torch.float32, "exact": True}


class OpLog(TorchDispatchMode):
    """The aten ops a block runs, by name (e.g. 'aten.index.Tensor')."""

    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func.overloadpacket) if "rfsr" not in str(func) else "rfsr")
        return func(*args, **(kwargs or {}))


COPIES = ("aten.index", "aten.clone", "aten.copy_", "aten._to_copy", "aten.contiguous", "aten.reflection_pad2d",
          "aten.roll", "aten.constant_pad_nd", "aten.cat")


@pytest.mark.parametrize("size, shift", [((16, 24), False), ((13, 19), False), ((13, 19), True)])
@pytest.mark.parametrize("gate", ["DWC", None])
def test_one_copy_each_side_of_the_op(size, shift, gate):
    # pad + shift + partition in one copy before the op, merge + unshift + crop in one after it (with a gate the
    # merge is the gate's product itself); the qkv GEMM reads the channels-last input in place
    attn = make_attn(window=8, shift=shift, gate_type=gate).eval()
    x = torch.randn(2, 12, *size).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        expected = attn(x)  # fills the factor and index caches
        with OpLog() as log:
            out = attn(x)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    copies = [n for n in log.names if n.startswith(COPIES)]
    reindex = shift or size != (16, 24)
    want = ["aten.index"] * 2 if reindex else ["aten.clone"] + ([] if gate else ["aten.clone"])
    assert sorted(copies) == sorted(want), log.names
    assert log.names.count("rfsr") == 1 and out.is_contiguous(memory_format=torch.channels_last)


def test_gather_indices_cached_per_size_and_device():
    attn = make_attn(window=4).eval()
    with torch.no_grad():
        attn(torch.randn(1, 12, 9, 7))
        idx = attn._indices[(9, 7, torch.device("cpu"))]
        attn(torch.randn(1, 12, 9, 7))
        assert attn._indices[(9, 7, torch.device("cpu"))] is idx
        attn(torch.randn(1, 12, 10, 7))
        assert len(attn._indices) == 2
        attn.double()
        assert not attn._indices  # device/dtype moves drop them


@pytest.mark.parametrize("size, window, shift, gate", CASES)
@pytest.mark.parametrize("padded", [False, True])
def test_window_ops_equal_the_modules_in_float64(size, window, shift, gate, padded):
    # use_op: pad + shift + partition as one rfsr::window_partition, merge + unshift + crop with the gate's sigmoid
    # and its product as one rfsr::window_merge (into the padded rows of pad_channels when padded); the same
    # function as the plain modules
    attn = make_attn(window=window, shift=shift, gate_type=gate).double().eval()
    x = torch.randn(2, 12, *size, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        expected = attn(x)
        if padded:
            attn.pad_channels(16)
            x = F.pad(x, (0, 0, 0, 0, 0, 4)).contiguous(memory_format=torch.channels_last)
        attn.use_op()
        with OpLog() as log:
            got = attn(x)
    assert attn.window_ops and got.shape == x.shape
    # partition, attention, merge (and the gate's conv); no gathers, sigmoid or product of their own
    assert log.names.count("rfsr") == 3 + (gate == "DWC"), log.names
    assert not [n for n in log.names if n.startswith(("aten.sigmoid", "aten.mul", "aten.index") + COPIES)], log.names
    torch.testing.assert_close(got[:, :12], expected, rtol=0, atol=1e-10)
    if padded:
        assert got[:, 12:].abs().max().item() == 0


def test_window_ops_step_aside_for_gradients_and_sigmoid_hooks():
    attn = make_attn(window=8, shift=True, gate_type="DWC").eval()
    x = torch.randn(1, 12, 13, 19)
    expected = attn(x)
    attn.use_op()
    got = attn(x)  # parameters need gradients: the modules run (and the result is differentiable)
    got.sum().backward()
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    seen = []
    attn.gate[-1].register_forward_hook(lambda m, a, o: seen.append(o.shape))
    with torch.no_grad():
        torch.testing.assert_close(attn(x), expected, rtol=0, atol=1e-6)
    assert seen == [(1, 12, 13, 19)]
