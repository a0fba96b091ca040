"""GPU tests of the fused CUDA backward of ``rfsr::flash_rfbias`` against the float64 reference.

The op is called directly with ``out``/``lse`` from the float64 reference, so these tests need no forward kernel.
Skipped without a CUDA device or when the fused backward is not registered (the extension was built without
``RFSR_WITH_CUDA_BWD``; the ATen fallback then serves CUDA and is covered by the CPU tests). Budget: ~1 minute.
"""
from __future__ import annotations

import pytest
import torch


cuda_ok = torch.cuda.is_available()
pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not cuda_ok, reason="needs a CUDA device")]

if cuda_ok:
    import rfsr_cuda  # noqa: F401  (registers the ops)
    from rfsr_cuda.ops.flash_rfbias import cuda_path_available
    from rfsr_cuda.ops.reference import flash_rfbias_reference

    def _fused_bwd_registered() -> bool:
        try:
            dump = torch._C._dispatch_dump("rfsr::flash_rfbias_bwd")
        except RuntimeError:
            return False
        return "rfbias_cuda_bwd" in dump

    if not _fused_bwd_registered():
        pytestmark.append(pytest.mark.skip(reason="fused CUDA backward not registered in this build"))


def _sm90_bwd_available() -> bool:
    """The wgmma backward kernels can run: a 9.x device and a build with -DRFSR_SM90_BWD (otherwise
    RFSR_BWD_PATH=sm90 raises)."""
    if not cuda_ok or torch.cuda.get_device_capability()[0] != 9:
        return False
    return cuda_path_available("bwd", "sm90")


@pytest.fixture(autouse=True, params=["sm80", "sm90"], scope="module")
def bwd_path(request):
    """Every test runs on the sm80 backward kernels and, where they are built (RFSR_NVCC_FLAGS=-DRFSR_SM90_BWD)
    and the device is 9.x, on the wgmma ones, forced with RFSR_BWD_PATH."""
    if request.param == "sm90" and not _sm90_bwd_available():
        pytest.skip("the wgmma backward needs a 9.x device and a build with -DRFSR_SM90_BWD")
    mp = pytest.MonkeyPatch()
    mp.setenv("RFSR_BWD_PATH", request.param)
    yield request.param
    mp.undo()


TOL = {torch.bfloat16: 2e-2, torch.float16: 1e-2}
NAMES = ("dq", "dk", "dv", "dbias_q", "dbias_k")


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Frobenius error relative to the reference, with a floor of 1e-3 per element in the denominator: gradients
    that are exactly zero in the reference (dq, dk with N = 1, where P = 1) carry fp32 rounding noise only."""
    a, b = a.double(), b.double()
    floor = 1e-3 * max(b.numel(), 1) ** 0.5
    return ((a - b).norm() / b.norm().clamp_min(floor)).item()


def make_inputs(B, N, H, D, R, dtype, batched, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    q, k, v, do = (torch.randn(B, N, H, D, device="cuda", dtype=dtype, generator=g) for _ in range(4))
    fshape = (B, H, N, R) if batched else (H, N, R)
    s = max(R, 1) ** -0.25  # bias term of order one
    bq = (torch.randn(fshape, device="cuda", generator=g) * s).to(dtype)
    bk = (torch.randn(fshape, device="cuda", generator=g) * s).to(dtype)
    return q, k, v, bq, bk, do


def reference(q, k, v, bq, bk, do, scale):
    """(out in q's dtype, lse float32) as the forward returns them, and float64 gradients of sum(out * do)."""
    xs = [t.detach().double().requires_grad_() for t in (q, k, v, bq, bk)]
    out, lse = flash_rfbias_reference(*xs, scale, compute_dtype=torch.float64, return_lse=True)
    grads = torch.autograd.grad(out, xs, do.double(), allow_unused=True)
    grads = [torch.zeros_like(x) if g is None else g for g, x in zip(grads, xs)]
    return out.detach().to(q.dtype), lse.detach().float(), grads


def poison_allocator(nbytes: int) -> None:
    """Leave a NaN-filled block in the caching allocator so that fresh outputs reuse it."""
    junk = torch.full((nbytes // 4 + 1024,), float("nan"), device="cuda", dtype=torch.float32)
    del junk


def run_bwd(do, q, k, v, bq, bk, out, lse, scale):
    # about the size of the outputs and workspace, capped (large per-window factor shapes)
    poison_allocator(min(8 * q.numel() * q.element_size() + 8 * bq.numel() * 4, 1 << 31))
    return torch.ops.rfsr.flash_rfbias_bwd(do, q, k, v, bq, bk, out, lse, scale)


def check(q, k, v, bq, bk, do, scale=None, tol=None):
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    out, lse, ref = reference(q, k, v, bq, bk, do, scale)
    got = run_bwd(do, q, k, v, bq, bk, out, lse, scale)
    tol = TOL[q.dtype] if tol is None else tol
    for name, g, r, x in zip(NAMES, got, ref, (q, k, v, bq, bk)):
        assert g.shape == x.shape and g.dtype == x.dtype and g.is_contiguous(), name
        assert not torch.isnan(g).any(), f"{name} has NaN (unwritten or poisoned elements)"
        if r.numel():
            e = rel_err(g, r)
            assert e <= tol, f"{name}: relative error {e:.3e} > {tol}"
    return got


# (N, D, R): every N, D and R of the grid appears with several partners; the last rows reach the wide buckets
# (D + R up to 256: Dqk 160, 192, 256).
GRID = [
    (1, 16, 0), (1, 30, 18), (1, 64, 64),
    (63, 16, 16), (63, 30, 34), (63, 32, 18), (63, 128, 0),
    (256, 30, 18), (256, 32, 16), (256, 16, 34), (256, 64, 0), (256, 64, 64),
    (257, 30, 34), (257, 16, 18), (257, 128, 0), (257, 32, 64),
    (1000, 30, 18), (1000, 64, 34), (1000, 16, 0), (1000, 32, 16),
    (100, 16, 48), (63, 128, 64), (257, 64, 128), (100, 32, 128), (64, 128, 128),
]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("batched", [False, True], ids=["shared", "per_batch"])
@pytest.mark.parametrize("N,D,R", GRID)
def test_grads_match_reference(N, D, R, batched, dtype):
    B, H = (2, 2) if N >= 1000 else (3, 2)
    check(*make_inputs(B, N, H, D, R, dtype, batched, seed=N * 131 + D * 7 + R))


def test_many_windows_shared_factors():
    # thousands of (window, head) pairs reduced into one (H, N, R) gradient
    check(*make_inputs(512, 64, 3, 32, 16, torch.bfloat16, False, seed=1))


def chunk_windows(B: int, N: int, H: int) -> int:
    """Windows one CTA walks (mirror of rfbias_bwd_chunking, csrc/rfbias/params_bwd.h): more than one only when a
    CTA per (64-row block, head, window) would exceed about 4096 CTAs."""
    per_chunk = -(-N // 64) * H
    want = min(max(-(-4096 // per_chunk), 1), B)
    return -(-B // want)


# Shapes whose CTAs walk several windows: shared-factor gradients summed in registers across windows, per-window
# ones written per window, the ring of tiles and the two stationary slots carried from one window to the next
# (a single tile per window for N = 16, partial last tiles for N = 100 and 70, an odd rank for R = 5).
CHUNKED = [(4500, 16, 1, 16, 8, torch.bfloat16, None), (3000, 100, 2, 30, 18, torch.bfloat16, None),
           (2100, 70, 2, 32, 5, torch.float16, None), (3000, 100, 2, 30, 18, torch.bfloat16, -0.5)]


@pytest.mark.parametrize("batched", [False, True], ids=["shared", "per_batch"])
@pytest.mark.parametrize("B,N,H,D,R,dtype,scale", CHUNKED, ids=["n16", "n100", "n70_odd_rank", "n100_neg_scale"])
def test_windows_chunked_per_cta(B, N, H, D, R, dtype, scale, batched):
    assert chunk_windows(B, N, H) > 1
    check(*make_inputs(B, N, H, D, R, dtype, batched, seed=B + N + R), scale=scale)


def test_few_huge_windows():
    check(*make_inputs(1, 4096, 2, 30, 34, torch.bfloat16, False, seed=2))


@pytest.mark.parametrize("scale", [0.3, 1e-4, 2000.0, -0.5], ids=["s0.3", "tiny", "huge", "negative"])
def test_scales(scale):
    q, k, v, bq, bk, do = make_inputs(2, 100, 2, 30, 18, torch.bfloat16, False, seed=3)
    if scale > 1:
        q, k = q * 0.01, k * 0.01  # keep the logits moderate
    check(q, k, v, bq, bk, do, scale=scale)


@pytest.mark.parametrize("B,N,H", [(64, 256, 3), (3000, 100, 2)], ids=["window_per_cta", "chunked"])
def test_deterministic(B, N, H):
    q, k, v, bq, bk, do = make_inputs(B, N, H, 30, 18, torch.bfloat16, False, seed=4)
    scale = 30 ** -0.5
    out, lse, _ = reference(q, k, v, bq, bk, do, scale)
    first = torch.ops.rfsr.flash_rfbias_bwd(do, q, k, v, bq, bk, out, lse, scale)
    for _ in range(9):
        again = torch.ops.rfsr.flash_rfbias_bwd(do, q, k, v, bq, bk, out, lse, scale)
        for name, a, b in zip(NAMES, first, again):
            assert torch.equal(a, b), f"{name} differs between runs"


def test_strided_inputs_and_grad_out():
    B, N, H, D, R = 3, 200, 2, 30, 18
    g = torch.Generator(device="cuda").manual_seed(5)
    qkv = torch.randn(B, N, 3, H, D, device="cuda", dtype=torch.bfloat16, generator=g)
    q, k, v = qkv.unbind(2)  # row stride 3*H*D: 4-byte aligned rows only (D = 30)
    do = torch.randn(B, H, N, D, device="cuda", dtype=torch.bfloat16, generator=g).transpose(1, 2)  # non-contiguous
    fb = torch.randn(H, N, 2 * R + 2, device="cuda", dtype=torch.bfloat16, generator=g) * R ** -0.25
    bq, bk = fb[..., :R], fb[..., R + 2:]  # strided factor rows
    assert not q.is_contiguous() and not do.is_contiguous() and not bq.is_contiguous()
    check(q, k, v, bq, bk, do)


def test_odd_element_offset_rows():
    # rows starting at odd element offsets (2-byte aligned) are copied once by the binding
    B, N, H, D, R = 2, 70, 2, 30, 17
    g = torch.Generator(device="cuda").manual_seed(6)
    buf = torch.randn(4, B, N, H, D + 1, device="cuda", dtype=torch.float16, generator=g)
    q, k, v, do = (buf[i, ..., 1:] for i in range(4))
    bq = torch.randn(H, N, R, device="cuda", dtype=torch.float16, generator=g) * R ** -0.25
    bk = torch.randn(H, N, R, device="cuda", dtype=torch.float16, generator=g) * R ** -0.25
    check(q, k, v, bq, bk, do)


def test_vec16_path_aligned_d64():
    check(*make_inputs(4, 130, 3, 64, 16, torch.float16, True, seed=7))


@pytest.mark.parametrize("D,R,dtype", [(15, 8, torch.bfloat16), (32, 16, torch.float32)], ids=["odd_D", "fp32"])
def test_fallback_cases(D, R, dtype):
    # not taken by the fused kernels: served by the ATen implementation, same results
    q, k, v, bq, bk, do = make_inputs(2, 40, 2, D, R, dtype, False, seed=8)
    check(q, k, v, bq, bk, do, tol=2e-2 if dtype != torch.float32 else 1e-4)


def test_empty_batch():
    q, k, v, bq, bk, do = make_inputs(0, 16, 2, 32, 8, torch.bfloat16, False, seed=9)
    lse = torch.zeros(0, 2, 16, device="cuda")
    got = torch.ops.rfsr.flash_rfbias_bwd(do, q, k, v, bq, bk, q, lse, 0.2)
    assert got[0].shape == q.shape and torch.equal(got[3], torch.zeros_like(bq))


def test_opcheck():
    q, k, v, bq, bk, do = make_inputs(2, 48, 2, 30, 18, torch.bfloat16, False, seed=10)
    scale = 30 ** -0.5
    out, lse, _ = reference(q, k, v, bq, bk, do, scale)
    torch.library.opcheck(torch.ops.rfsr.flash_rfbias_bwd.default, (do, q, k, v, bq, bk, out, lse, scale))
