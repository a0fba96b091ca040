"""The op contract on CPU and Meta: values against the float64 oracle, gradients, opcheck, compile, errors."""
import pytest
import torch

import rfsr_cuda
from rfsr_cuda.ops import flash_rfbias, flash_rfbias_concat, flash_rfbias_reference

OPS = torch.ops.rfsr


def make_inputs(B, N, H, D, R, *, batched=False, dtype=torch.float32, strided=False, device="cpu"):
    """q, k, v as (B, N, H, D); with ``strided`` they are views into one (B, N, 3, H, D+2) buffer, as a
    rearranged projection output would be."""
    if strided:
        buf = torch.randn(B, N, 3, H, D + 2, dtype=dtype, device=device)
        q, k, v = (buf[:, :, i, :, 1:D + 1] for i in range(3))
    else:
        q, k, v = (torch.randn(B, N, H, D, dtype=dtype, device=device) for _ in range(3))
    shape = (B, H, N, R) if batched else (H, N, R)
    bq = 0.5 * torch.randn(*shape, dtype=dtype, device=device)
    bk = 0.5 * torch.randn(*shape, dtype=dtype, device=device)
    return [q, k, v, bq, bk]


CASES = [
    # B, N, H, D, R, batched, strided
    (2, 1, 1, 4, 3, False, False),
    (3, 63, 2, 8, 5, False, True),
    (2, 64, 3, 16, 0, False, False),
    (4, 49, 2, 6, 7, True, False),
    (1, 257, 1, 30, 18, False, True),
    (2, 100, 2, 12, 4, True, True),
]


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_forward_matches_reference(case, dtype):
    B, N, H, D, R, batched, strided = case
    q, k, v, bq, bk = make_inputs(B, N, H, D, R, batched=batched, dtype=dtype, strided=strided)
    out, lse = OPS.flash_rfbias_fwd(q, k, v, bq, bk, 0.37)
    ref, ref_lse = flash_rfbias_reference(q.double(), k.double(), v.double(), bq.double(), bk.double(), 0.37,
                                          return_lse=True)
    tol = 1e-12 if dtype == torch.float64 else 2e-6
    assert out.shape == (B, N, H, D) and out.dtype == dtype and out.is_contiguous()
    assert lse.shape == (B, H, N)
    assert _rel(out, ref) < tol
    assert (lse.double() - ref_lse).abs().max().item() < 1e3 * tol


@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 1e-2), (torch.float16, 2e-3)])
def test_low_precision_inputs_accumulate_in_float32(dtype, tol):
    q, k, v, bq, bk = make_inputs(3, 200, 2, 16, 8, dtype=dtype)
    out = flash_rfbias(q, k, v, bq, bk)
    ref = flash_rfbias_reference(q.double(), k.double(), v.double(), bq.double(), bk.double())
    assert out.dtype == dtype
    assert _rel(out, ref) < tol


def test_default_scale_is_inverse_sqrt_head_dim():
    q, k, v, bq, bk = make_inputs(2, 20, 2, 9, 3)
    torch.testing.assert_close(flash_rfbias(q, k, v, bq, bk), OPS.flash_rfbias_fwd(q, k, v, bq, bk, 9 ** -0.5)[0])
    torch.testing.assert_close(OPS.flash_rfbias(q, k, v, bq, bk, None), flash_rfbias(q, k, v, bq, bk, scale=1 / 3))


def test_bias_changes_the_result_and_rank_zero_is_plain_attention():
    q, k, v, bq, bk = make_inputs(2, 30, 2, 8, 4)
    plain = torch.nn.functional.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v))).transpose(1, 2)
    empty = bq[..., :0]
    torch.testing.assert_close(flash_rfbias(q, k, v, empty, empty), plain, atol=1e-6, rtol=1e-5)
    assert (flash_rfbias(q, k, v, bq, bk) - plain).abs().max() > 1e-2


def test_shared_factors_equal_expanded_per_batch_factors():
    q, k, v, bq, bk = make_inputs(5, 40, 3, 8, 6)
    ex = [t.unsqueeze(0).expand(5, -1, -1, -1) for t in (bq, bk)]
    torch.testing.assert_close(flash_rfbias(q, k, v, bq, bk), flash_rfbias(q, k, v, *ex))


def test_concat_route_is_the_same_function():
    q, k, v, bq, bk = make_inputs(3, 45, 2, 10, 6)
    torch.testing.assert_close(flash_rfbias_concat(q, k, v, bq, bk), flash_rfbias_reference(q, k, v, bq, bk),
                               atol=2e-6, rtol=1e-5)


def test_chunking_over_many_rows_and_windows():
    # N large enough that query rows are split into several chunks, and many small windows batched per step
    q, k, v, bq, bk = make_inputs(1, 3000, 2, 8, 4)
    ref = flash_rfbias_reference(q.double(), k.double(), v.double(), bq.double(), bk.double())
    assert _rel(flash_rfbias(q, k, v, bq, bk), ref) < 2e-6
    q, k, v, bq, bk = make_inputs(700, 16, 1, 4, 2)
    ref = flash_rfbias_reference(q.double(), k.double(), v.double(), bq.double(), bk.double())
    assert _rel(flash_rfbias(q, k, v, bq, bk), ref) < 2e-6


@pytest.mark.parametrize("case", CASES)
def test_gradients_match_reference(case):
    B, N, H, D, R, batched, strided = case
    ins = [t.detach().double().requires_grad_() for t in make_inputs(B, N, H, D, R, batched=batched)]
    ref_ins = [t.detach().clone().requires_grad_() for t in ins]
    g = torch.randn(B, N, H, D, dtype=torch.float64)
    ours = torch.autograd.grad(flash_rfbias(*ins, scale=0.6), ins, g)
    refs = torch.autograd.grad(flash_rfbias_reference(*ref_ins, scale=0.6), ref_ins, g)
    for name, a, b in zip(("q", "k", "v", "bias_q", "bias_k"), ours, refs):
        assert a.shape == b.shape, name
        if b.numel():
            assert _rel(a, b) < 1e-10, name


def test_gradients_with_noncontiguous_grad_out_and_strided_inputs():
    q, k, v, bq, bk = make_inputs(2, 33, 2, 6, 3, strided=True, dtype=torch.float64)
    leaves = [t.requires_grad_() for t in (q, k, v, bq, bk)]  # q, k, v stay strided views
    g = torch.randn(2, 6, 2, 33, dtype=torch.float64).permute(0, 3, 2, 1)  # (B, N, H, D), last-dim stride 66
    assert q.stride(-1) == 1 and not q.is_contiguous()
    out = flash_rfbias(*leaves)
    ref_leaves = [t.detach().clone().requires_grad_() for t in leaves]
    ref = flash_rfbias_reference(*ref_leaves)
    for a, b in zip(torch.autograd.grad(out, leaves, g), torch.autograd.grad(ref, ref_leaves, g)):
        assert _rel(a, b) < 1e-10


def test_backward_takes_saved_tensors_with_any_layout():
    # torch.compile may hand the backward saved tensors re-strided (inductor's layout optimisation): last-dim
    # strides other than 1 must still give the same gradients.
    from types import SimpleNamespace

    from rfsr_cuda.ops.flash_rfbias import _backward

    q, k, v, bq, bk = [t.double() for t in make_inputs(2, 20, 2, 6, 3)]
    out, lse = OPS.flash_rfbias_fwd(q, k, v, bq, bk, 0.4)
    g = torch.randn_like(out)

    def relaid(t):  # same values, last dimension not unit-stride
        return t.transpose(-1, -2).contiguous().transpose(-1, -2) if t.dim() >= 2 else t

    plain = _backward(SimpleNamespace(saved_tensors=(q, k, v, bq, bk, out, lse), scale=0.4), g, None)
    moved = [relaid(t) for t in (q, k, v, bq, bk, out)]
    assert all(t.stride(-1) != 1 for t in moved)
    odd = _backward(SimpleNamespace(saved_tensors=(*moved, lse), scale=0.4), relaid(g), None)
    for a, b in zip(plain[:5], odd[:5]):
        assert torch.allclose(a, b, rtol=0, atol=1e-12)


@pytest.mark.parametrize("batched", [False, True])
def test_cpu_op_ignores_autocast(batched):
    # the CPU kernels compute in float32 whatever autocast the caller has on (as the CUDA kernels do): same values
    # and gradients with and without torch.autocast(bfloat16)
    ins = make_inputs(3, 40, 2, 6, 5, batched=batched)

    def run():
        leaves = [t.detach().clone().requires_grad_() for t in ins]
        out = flash_rfbias(*leaves)
        out.backward(torch.ones_like(out))
        return out.detach(), [t.grad for t in leaves]

    plain_out, plain_grads = run()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto_out, auto_grads = run()
    assert auto_out.dtype == torch.float32
    torch.testing.assert_close(auto_out, plain_out, rtol=0, atol=0)
    for a, b in zip(auto_grads, plain_grads):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("batched", [False, True])
def test_gradcheck_float64(batched):
    ins = [t.double().requires_grad_() for t in make_inputs(2, 7, 2, 3, 2, batched=batched)]
    assert torch.autograd.gradcheck(lambda *x: flash_rfbias(*x, scale=0.8), ins)


def test_shared_factor_gradient_is_sum_over_windows():
    q, k, v, bq, bk = [t.double() for t in make_inputs(4, 12, 2, 4, 3)]
    bq.requires_grad_(); bk.requires_grad_()
    g = torch.randn(4, 12, 2, 4, dtype=torch.float64)
    dbq, dbk = torch.autograd.grad(flash_rfbias(q, k, v, bq, bk), (bq, bk), g)
    per = [torch.autograd.grad(flash_rfbias(q[i:i + 1], k[i:i + 1], v[i:i + 1], bq, bk), (bq, bk), g[i:i + 1])
           for i in range(4)]
    torch.testing.assert_close(dbq, sum(p[0] for p in per))
    torch.testing.assert_close(dbk, sum(p[1] for p in per))


def _opcheck_samples():
    for B, N, H, D, R, batched, strided in CASES[:4]:
        yield make_inputs(B, N, H, D, R, batched=batched, strided=strided, dtype=torch.float64)


@pytest.mark.parametrize("idx", range(4))
def test_opcheck(idx):
    q, k, v, bq, bk = list(_opcheck_samples())[idx]
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v, bq, bk)]
    torch.library.opcheck(OPS.flash_rfbias_fwd.default, (*leaves, 0.5))
    out, lse = OPS.flash_rfbias_fwd(q, k, v, bq, bk, 0.5)
    torch.library.opcheck(OPS.flash_rfbias_bwd.default, (torch.randn_like(out), q, k, v, bq, bk, out, lse, 0.5))
    torch.library.opcheck(OPS.flash_rfbias.default, (*leaves, None))


def test_meta_tensors_give_shapes_without_data():
    q, k, v, bq, bk = make_inputs(3, 20, 2, 6, 4, device="meta")
    out, lse = OPS.flash_rfbias_fwd(q, k, v, bq, bk, 1.0)
    assert out.device.type == "meta" and out.shape == (3, 20, 2, 6) and lse.shape == (3, 2, 20)
    assert lse.dtype == torch.float32
    assert flash_rfbias(q, k, v, bq, bk).shape == (3, 20, 2, 6)


def test_torch_compile_fullgraph_forward_and_backward():
    torch._dynamo.reset()
    ins = [t.requires_grad_() for t in make_inputs(2, 24, 2, 8, 4)]

    def f(q, k, v, bq, bk):
        return (flash_rfbias(q * 2, k, v, bq, bk).sin() * 3).sum()

    compiled = torch.compile(f, fullgraph=True)
    ref_ins = [t.detach().clone().requires_grad_() for t in ins]
    loss = compiled(*ins)
    ref = f(*ref_ins)
    torch.testing.assert_close(loss, ref)
    for a, b in zip(torch.autograd.grad(loss, ins), torch.autograd.grad(ref, ref_ins)):
        torch.testing.assert_close(a, b)


def test_public_names():
    assert rfsr_cuda.reference is flash_rfbias_reference
    assert rfsr_cuda.flash_rfbias is flash_rfbias


def _bad_cases():
    good = dict(q=(2, 8, 2, 4), k=(2, 8, 2, 4), v=(2, 8, 2, 4), bias_q=(2, 8, 3), bias_k=(2, 8, 3))
    yield "q rank", dict(good, q=(2, 8, 8)), ValueError, "q must be 4-D"
    yield "k shape", dict(good, k=(2, 8, 2, 5)), ValueError, "k must have the shape of q"
    yield "v tokens", dict(good, v=(2, 9, 2, 4)), ValueError, "v must have the shape of q"
    yield "bias rank", dict(good, bias_q=(8, 3), bias_k=(8, 3)), ValueError, "bias_q must be (H, N, R)"
    yield "bias N", dict(good, bias_q=(2, 7, 3), bias_k=(2, 7, 3)), ValueError, "bias_q must be (H, N, R)"
    yield "bias heads", dict(good, bias_q=(3, 8, 3), bias_k=(3, 8, 3)), ValueError, "bias_q must be (H, N, R)"
    yield "bias batch", dict(good, bias_q=(3, 2, 8, 3), bias_k=(3, 2, 8, 3)), ValueError, "bias_q must be (H, N, R)"
    yield "R mismatch", dict(good, bias_k=(2, 8, 4)), ValueError, "bias_k must have the shape of bias_q"


@pytest.mark.parametrize("device", ["cpu", "meta"])
@pytest.mark.parametrize("name,shapes,exc,msg", list(_bad_cases()), ids=[c[0] for c in _bad_cases()])
def test_bad_shapes_raise_clear_errors(device, name, shapes, exc, msg):
    ts = [torch.randn(*shapes[n], device=device) for n in ("q", "k", "v", "bias_q", "bias_k")]
    with pytest.raises(exc, match=msg.replace("(", r"\(").replace(")", r"\)")):
        OPS.flash_rfbias_fwd(*ts, 1.0)
    with pytest.raises(exc):
        flash_rfbias(*ts)


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_bad_dtypes_devices_strides(device):
    q, k, v, bq, bk = make_inputs(2, 8, 2, 4, 3, device=device)
    with pytest.raises(TypeError, match="k has dtype"):
        OPS.flash_rfbias_fwd(q, k.double(), v, bq, bk, 1.0)
    with pytest.raises(TypeError, match="bias_q has dtype"):
        OPS.flash_rfbias_fwd(q, k, v, bq.half(), bk, 1.0)
    with pytest.raises(TypeError, match="floating-point"):
        OPS.flash_rfbias_fwd(*(t.to(torch.int32) for t in (q, k, v, bq, bk)), 1.0)
    strided = torch.randn(2, 8, 2, 8, device=device)[..., ::2]
    with pytest.raises(ValueError, match="q must have unit stride"):
        OPS.flash_rfbias_fwd(strided, k, v, bq, bk, 1.0)
    with pytest.raises(ValueError, match="finite"):
        OPS.flash_rfbias_fwd(q, k, v, bq, bk, float("nan"))


def test_mixed_devices_raise():
    q, k, v, bq, bk = make_inputs(2, 8, 2, 4, 3)
    with pytest.raises(ValueError, match="v is on meta"):
        OPS.flash_rfbias_fwd(q, k, v.to("meta"), bq, bk, 1.0)


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_backward_op_checks_its_extra_inputs(device):
    q, k, v, bq, bk = make_inputs(2, 8, 2, 4, 3, device=device)
    out, lse = OPS.flash_rfbias_fwd(q, k, v, bq, bk, 1.0)
    with pytest.raises(ValueError, match="lse must be"):
        OPS.flash_rfbias_bwd(out, q, k, v, bq, bk, out, lse[:, :1], 1.0)
    with pytest.raises(ValueError, match="grad_out must have the shape"):
        OPS.flash_rfbias_bwd(out[:1], q, k, v, bq, bk, out, lse, 1.0)
    with pytest.raises(TypeError, match="lse must have dtype"):
        OPS.flash_rfbias_bwd(out, q, k, v, bq, bk, out, lse.double(), 1.0)
