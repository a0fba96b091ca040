"""GPU tests of the fused CUDA forward of ``rfsr::flash_rfbias`` against the float64 reference.

Skipped without a CUDA device (or without the CUDA build of the extension). Budget: well under two minutes.
Every test runs on the sm80 kernels and, on 9.x devices, also on the wgmma (sm90) kernels (fixture ``kernel_path``).
"""
from __future__ import annotations

import functools
import math

import pytest
import torch


cuda_ok = torch.cuda.is_available()
pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not cuda_ok, reason="needs a CUDA device")]

if cuda_ok:
    import rfsr_cuda  # noqa: F401  (registers the ops)
    from rfsr_cuda.ops.flash_rfbias import cuda_path_available
    from rfsr_cuda.ops.reference import flash_rfbias_reference

    def _has_cuda_kernel() -> bool:
        try:
            q = torch.zeros(1, 1, 1, 2, device="cuda", dtype=torch.bfloat16)
            b = torch.zeros(1, 1, 0, device="cuda", dtype=torch.bfloat16)
            torch.ops.rfsr.flash_rfbias_fwd(q, q, q, b, b, 1.0)
            return True
        except (NotImplementedError, RuntimeError):
            return False

    if not _has_cuda_kernel():
        pytestmark.append(pytest.mark.skip(reason="extension built without CUDA kernels"))



@functools.lru_cache(maxsize=None)
def _sm90_path_available() -> bool:
    """The wgmma forward kernels are usable: a 9.x device and a build that has them (the default when building for
    9.0, or RFSR_KERNELS=all,sm90); otherwise RFSR_FWD_PATH=sm90 raises."""
    if not cuda_ok or torch.cuda.get_device_capability()[0] != 9:
        return False
    return cuda_path_available("fwd", "sm90")


@pytest.fixture(autouse=True, params=["sm80", "sm90"])
def kernel_path(request, monkeypatch):
    """Every test runs on the sm80 kernels and, where they are built and the device is 9.x, on the warp-specialised
    wgmma kernel, each forced with RFSR_FWD_PATH, so both paths meet the same checks whatever the default picks."""
    if request.param != "sm80" and not _sm90_path_available():
        pytest.skip("the wgmma (sm90) path needs a 9.x device and a build with the sm90 kernels")
    monkeypatch.setenv("RFSR_FWD_PATH", request.param)
    return request.param


TOL = {torch.bfloat16: 1e-2, torch.float16: 5e-3}
LSE_TOL = {torch.bfloat16: 3e-2, torch.float16: 1e-2}  # max abs error of the natural-log lse


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def make_inputs(B, N, H, D, R, dtype, batched, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    q, k, v = (torch.randn(B, N, H, D, device="cuda", dtype=dtype, generator=g) for _ in range(3))
    fshape = (B, H, N, R) if batched else (H, N, R)
    s = max(R, 1) ** -0.25  # bias term of order one
    bq = (torch.randn(fshape, device="cuda", generator=g) * s).to(dtype)
    bk = (torch.randn(fshape, device="cuda", generator=g) * s).to(dtype)
    return q, k, v, bq, bk


def reference(q, k, v, bq, bk, scale):
    out, lse = flash_rfbias_reference(q.double(), k.double(), v.double(), bq.double(), bk.double(), scale,
                                      compute_dtype=torch.float64, return_lse=True)
    return out, lse


def poison_allocator(nbytes: int) -> None:
    """Leave a NaN-filled block in the caching allocator so that the op's fresh output reuses it."""
    junk = torch.full((nbytes // 4 + 1024,), float("nan"), device="cuda", dtype=torch.float32)
    del junk


def run_fwd(q, k, v, bq, bk, scale):
    B, N, H, D = q.shape
    poison_allocator(B * N * H * D * q.element_size() + B * H * N * 4)
    return torch.ops.rfsr.flash_rfbias_fwd(q, k, v, bq, bk, scale)


def check_against_reference(q, k, v, bq, bk, scale=None):
    D = q.shape[-1]
    scale = D ** -0.5 if scale is None else scale
    out, lse = run_fwd(q, k, v, bq, bk, scale)
    assert out.shape == q.shape and out.dtype == q.dtype and out.is_contiguous()
    assert lse.shape == (q.shape[0], q.shape[2], q.shape[1]) and lse.dtype == torch.float32
    assert not torch.isnan(out).any(), "output has NaN (unwritten or poisoned elements)"
    assert not torch.isnan(lse).any(), "lse has NaN"
    ref, ref_lse = reference(q, k, v, bq, bk, scale)
    e = rel_err(out, ref)
    assert e <= TOL[q.dtype], f"relative error {e:.3e}"
    if lse.numel():
        le = (lse.double() - ref_lse).abs().max().item()
        assert le <= LSE_TOL[q.dtype], f"lse max abs error {le:.3e}"
    return out, lse


# --- accuracy grid ---------------------------------------------------------------------------------------------

NS = [1, 63, 256, 257, 1000, 4096]
DS = [16, 30, 32, 64, 128]
RS = [0, 16, 18, 34, 64]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("R", RS)
@pytest.mark.parametrize("D", DS)
@pytest.mark.parametrize("N", NS)
def test_grid(N, D, R, dtype):
    batched = (N + D + R) % 2 == 1  # alternate shared and per-batch factors over the grid
    B, H = (1, 1) if N >= 4096 else (2, 3) if N >= 1000 else (3, 2)
    q, k, v, bq, bk = make_inputs(B, N, H, D, R, dtype, batched, seed=N * 1000 + D * 10 + R)
    check_against_reference(q, k, v, bq, bk)


@pytest.mark.parametrize("batched", [False, True], ids=["shared", "per_batch"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_factor_layouts(batched, dtype):
    q, k, v, bq, bk = make_inputs(4, 200, 3, 30, 18, dtype, batched, seed=7)
    check_against_reference(q, k, v, bq, bk)


@pytest.mark.parametrize("R", [1, 17, 33])
def test_odd_rank(R):
    q, k, v, bq, bk = make_inputs(2, 130, 2, 32, R, torch.bfloat16, False, seed=R)
    check_against_reference(q, k, v, bq, bk)


@pytest.mark.parametrize("D", [30, 32])
@pytest.mark.parametrize("scale", [0.0, -0.3, 1e-4, 0.125, 3.0, 2000.0])
def test_scales(scale, D):
    # 0, negative and extreme scales take the q-side placement of the scale (also with 16-byte copies, D = 32)
    q, k, v, bq, bk = make_inputs(2, 100, 2, D, 16, torch.float16, False, seed=3)
    if scale > 100:
        q = q * 0.01  # keep logits moderate
    check_against_reference(q, k, v, bq, bk, scale=scale)


def test_factor_views():
    # factors as strided views (last dim contiguous), e.g. slices of a wider projection
    q, k, v, _, _ = make_inputs(2, 96, 3, 30, 18, torch.bfloat16, False, seed=11)
    wide = torch.randn(3, 96, 40, device="cuda").to(torch.bfloat16) * 0.5
    check_against_reference(q, k, v, wide[..., 1:19], wide[..., 20:38])


# --- strided inputs ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("D", [30, 32, 16])
def test_packed_qkv_views(D):
    # (B, N, 3*H*D) projection output viewed as q, k, v: rows and heads only 4-byte aligned for D = 30
    B, N, H, R = 3, 257, 6, 18
    qkv = torch.randn(B, N, 3 * H * D, device="cuda", dtype=torch.bfloat16)
    q, k, v = qkv.view(B, N, 3, H, D).unbind(2)
    assert not q.is_contiguous()
    bq = torch.randn(H, N, R, device="cuda").to(torch.bfloat16) * 0.5
    bk = torch.randn(H, N, R, device="cuda").to(torch.bfloat16) * 0.5
    check_against_reference(q, k, v, bq, bk)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("D", [6, 62, 126])
def test_head_dims_below_the_bucket_width(D, dtype):
    # D % 8 != 0 in the 16-, 64- and 128-wide V buckets (several copy units per row; 64-key tiles for D = 126 with
    # R = 64): the wgmma kernel's row sums come from V's first pad column there
    q, k, v, bq, bk = make_inputs(2, 257, 2, D, 64, dtype, False, seed=D)
    check_against_reference(q, k, v, bq, bk)


@pytest.mark.parametrize("D", [16, 32])
def test_rows_4byte_aligned_at_full_bucket_width(D):
    # D % 8 == 0 but rows only 4-byte aligned (a view at a 2-element offset): the wgmma kernel's 4-byte path needs a
    # pad column in V, which D = 16 / 32 rows lack, so the binding copies them; the result must not change
    B, N, H, R = 2, 300, 2, 18
    buf = torch.randn(B * N * H * D * 3 + 2, device="cuda", dtype=torch.bfloat16)
    q, k, v = buf[2:].view(3, B, N, H, D).unbind(0)
    assert q.data_ptr() % 16 != 0
    bq = torch.randn(H, N, R, device="cuda").to(torch.bfloat16) * 0.5
    bk = torch.randn(H, N, R, device="cuda").to(torch.bfloat16) * 0.5
    check_against_reference(q, k, v, bq, bk)


def test_channels_last_views():
    # a channels-last qkv 1x1-conv output (images, height, width, 3*H*D) with one window per image row band,
    # read sequence-first: strides of batch and sequence swapped relative to a contiguous tensor
    imgs, hh, ww, H, D, R = 4, 8, 16, 6, 30, 18
    conv = torch.randn(imgs, 3 * H * D, hh, ww, device="cuda", dtype=torch.float16)
    conv = conv.contiguous(memory_format=torch.channels_last)
    x = conv.permute(0, 2, 3, 1).reshape(imgs, hh * ww, 3, H, D)  # a view, no copy
    assert x.data_ptr() == conv.data_ptr()
    q, k, v = x.unbind(2)
    seq_first = torch.randn(hh * ww, imgs, 3, H, D, device="cuda", dtype=torch.float16)
    q2, k2, v2 = seq_first.transpose(0, 1).unbind(2)
    N = hh * ww
    bq = torch.randn(imgs, H, N, R, device="cuda").half() * 0.5
    bk = torch.randn(imgs, H, N, R, device="cuda").half() * 0.5
    check_against_reference(q, k, v, bq, bk)
    check_against_reference(q2, k2, v2, bq, bk)


def test_large_batch():
    # more windows than gridDim.y/z could hold
    B, N, H, D, R = 70_000, 16, 1, 16, 16
    q, k, v, bq, bk = make_inputs(B, N, H, D, R, torch.bfloat16, False, seed=5)
    check_against_reference(q, k, v, bq, bk)


@pytest.mark.parametrize("N,D,R,batched", [(200, 30, 18, False), (450, 30, 34, True), (70, 16, 24, False),
                                             (300, 32, 32, True)])
def test_persistent_item_stream(N, D, R, batched):
    # The wgmma kernel's persistent CTAs walk several work items each (192 query rows of one window and head),
    # carrying the K/V ring and the two query buffers from one item to the next. Many windows per CTA, with N leaving
    # two, one or no consumers of a window's last item without rows, must each get their own output and lse.
    B = 1200 // (N // 64 + 1)
    q, k, v, bq, bk = make_inputs(B, N, 2, D, R, torch.bfloat16, batched, seed=N + D + R)
    v = v * torch.linspace(0.5, 2.0, B, device="cuda", dtype=v.dtype)[:, None, None, None]  # windows differ in scale
    check_against_reference(q, k, v, bq, bk)


@pytest.mark.parametrize("D,R", [(30, 18), (32, 32), (16, 7)])
def test_shared_factor_matches_its_per_window_copy_exactly(D, R):
    # A shared factor may be pre-scaled by 1 / scale outside the kernel (the wgmma path), a per-window one is scaled
    # inside it: both must round bias_q * (1 / scale) the same way, so the outputs agree bit for bit.
    B, N, H = 3, 300, 2
    q, k, v, bq, bk = make_inputs(B, N, H, D, R, torch.bfloat16, False, seed=D + R)
    out, lse = run_fwd(q, k, v, bq, bk, 0.37)
    out_b, lse_b = run_fwd(q, k, v, bq.expand(B, -1, -1, -1).contiguous(), bk.expand(B, -1, -1, -1).contiguous(), 0.37)
    assert torch.equal(out, out_b) and torch.equal(lse, lse_b)


@pytest.mark.parametrize("D,R,N", [(30, 34, 2304), (32, 32, 4096)])
def test_forward_allocates_its_outputs_and_at_most_one_factor(D, R, N):
    # No concatenated, expanded or padded copies: a call allocates out and lse, plus (wgmma path, shared factor) the
    # factor scaled by 1 / scale, whose float32 intermediate is gone before out and lse are allocated.
    B, H = 4, 3
    q, k, v, bq, bk = make_inputs(B, N, H, D, R, torch.bfloat16, False, seed=D + R)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out, lse = torch.ops.rfsr.flash_rfbias_fwd(q, k, v, bq, bk, D ** -0.5)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    bound = sum((t.numel() * t.element_size() + 511) // 512 * 512 for t in (out, lse, bq))  # the allocator's blocks
    assert peak <= bound, (peak, bound)


# --- behaviour -----------------------------------------------------------------------------------------------------

def test_windows_do_not_leak():
    # Non-finite values in one window must not reach another: the wgmma kernel's persistent CTAs reuse shared-memory
    # slots across windows, so a partial key tile's rows past N must be zeros, not the previous window's keys.
    B, N, H, D, R = 400, 200, 1, 30, 18
    q, k, v, bq, bk = make_inputs(B, N, H, D, R, torch.bfloat16, False, seed=11)
    k[0] = float("inf")
    v[0] = float("nan")
    out, _ = run_fwd(q, k, v, bq, bk, D ** -0.5)
    ref, _ = reference(q[1:], k[1:], v[1:], bq, bk, D ** -0.5)
    assert torch.isfinite(out[1:]).all()
    assert rel_err(out[1:], ref) <= TOL[torch.bfloat16]


def test_deterministic():
    q, k, v, bq, bk = make_inputs(8, 300, 4, 30, 18, torch.bfloat16, False, seed=9)
    a, la = run_fwd(q, k, v, bq, bk, 0.2)
    b, lb = run_fwd(q, k, v, bq, bk, 0.2)
    assert torch.equal(a, b) and torch.equal(la, lb)


def test_default_path_choice(kernel_path, monkeypatch):
    """Unforced, a 9.x device runs the warp-specialised wgmma kernel on the narrow buckets (Dqk <= 64, Dv <= 32)
    from the window size where it measured faster (N >= 512 with 16-byte rows or Dqk = 64, N >= 1536 otherwise,
    N >= 2048 when its producer must rescale every query tile: per-window factors) and the sm80 kernels below;
    other devices always run sm80. The kernels are deterministic, so the unforced output equals the chosen path's
    bit for bit."""
    if kernel_path != "sm80":
        pytest.skip("checks the unforced choice once")

    def fwd(path, inputs):
        if path is None:
            monkeypatch.delenv("RFSR_FWD_PATH", raising=False)
        else:
            monkeypatch.setenv("RFSR_FWD_PATH", path)
        return torch.ops.rfsr.flash_rfbias_fwd(*inputs, 0.2)[0]

    wgmma = torch.cuda.get_device_capability()[0] == 9 and _sm90_path_available()
    on_9x = "sm90" if wgmma else "sm80"
    cases = [  # (B, N, H, D, R, dtype, per-window factors), the path an unforced call takes on a 9.x device
        ((2, 2304, 2, 30, 34, torch.bfloat16, False), on_9x),
        ((1, 2304, 2, 16, 24, torch.float16, False), on_9x),
        ((2, 576, 2, 16, 24, torch.bfloat16, False), on_9x),  # 16-byte rows
        ((2, 576, 2, 30, 34, torch.bfloat16, False), on_9x),  # 4-byte rows, Dqk 64
        ((2, 1600, 1, 30, 18, torch.bfloat16, False), on_9x),  # 4-byte rows, Dqk 48
        ((2, 1024, 2, 30, 18, torch.bfloat16, False), "sm80"),  # 4-byte rows, Dqk 48: below 1536
        ((2, 256, 2, 32, 32, torch.bfloat16, False), "sm80"),
        ((2, 1024, 2, 16, 24, torch.bfloat16, True), "sm80"),  # per-window factors: below 2048
        ((1, 2304, 1, 16, 24, torch.bfloat16, True), on_9x),
        ((1, 2304, 1, 64, 64, torch.bfloat16, False), "sm80"),  # Dqk 128: stays on sm80
    ]
    for seed, (shape, path) in enumerate(cases):
        inputs = make_inputs(*shape, seed=seed)
        assert torch.equal(fwd(None, inputs), fwd(path, inputs)), (shape, path)


def test_composite_default_scale():
    q, k, v, bq, bk = make_inputs(2, 64, 2, 32, 16, torch.bfloat16, False, seed=1)
    out = torch.ops.rfsr.flash_rfbias(q, k, v, bq, bk)
    ref, _ = reference(q, k, v, bq, bk, 32 ** -0.5)
    assert rel_err(out, ref) <= TOL[torch.bfloat16]


def test_cpu_and_cuda_agree():
    q, k, v, bq, bk = make_inputs(2, 77, 3, 30, 18, torch.bfloat16, False, seed=21)
    out, lse = torch.ops.rfsr.flash_rfbias_fwd(q, k, v, bq, bk, 0.3)
    cpu = [t.cpu().float() for t in (q, k, v, bq, bk)]
    out_c, lse_c = torch.ops.rfsr.flash_rfbias_fwd(*cpu, 0.3)
    assert rel_err(out.cpu().float(), out_c) <= 1e-2
    assert (lse.cpu() - lse_c).abs().max().item() <= 3e-2


def test_cuda_graph():
    q, k, v, bq, bk = make_inputs(16, 256, 6, 30, 18, torch.bfloat16, False, seed=2)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            torch.ops.rfsr.flash_rfbias_fwd(q, k, v, bq, bk, 0.2)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out, lse = torch.ops.rfsr.flash_rfbias_fwd(q, k, v, bq, bk, 0.2)
    g.replay()
    ref, ref_lse = torch.ops.rfsr.flash_rfbias_fwd(q, k, v, bq, bk, 0.2)
    torch.cuda.synchronize()
    assert torch.equal(out, ref) and torch.equal(lse, ref_lse)
    for t in (q, k, v, bq, bk):
        t.copy_(torch.randn_like(t) * (0.5 if t.dim() == 3 else 1.0))
    g.replay()
    ref2, _ = torch.ops.rfsr.flash_rfbias_fwd(q, k, v, bq, bk, 0.2)
    torch.cuda.synchronize()
    assert torch.equal(out, ref2)


def test_empty_inputs():
    q, k, v, bq, bk = make_inputs(0, 16, 2, 32, 16, torch.bfloat16, False, seed=0)
    out, lse = torch.ops.rfsr.flash_rfbias_fwd(q, k, v, bq, bk, 0.2)
    assert out.shape == q.shape and lse.shape == (0, 2, 16)


@pytest.mark.parametrize(
    "D,R,dtype,exc,match",
    [
        (32, 16, torch.float32, TypeError, "bfloat16"),
        (31, 16, torch.bfloat16, ValueError, "even"),
        (130, 16, torch.bfloat16, ValueError, "128"),
        (32, 130, torch.bfloat16, ValueError, "128"),
    ],
)
def test_errors(D, R, dtype, exc, match):
    q = torch.randn(1, 8, 1, D, device="cuda", dtype=dtype)
    b = torch.randn(1, 8, R, device="cuda", dtype=dtype)
    torch.cuda.synchronize()
    with pytest.raises(exc, match=match):
        torch.ops.rfsr.flash_rfbias_fwd(q, q, q, b, b, 0.1)
