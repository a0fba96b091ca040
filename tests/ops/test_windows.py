"""rfsr::window_partition and rfsr::window_merge on the CPU, Meta and (marked cuda) CUDA: values against the model's
own gathers (the pad, shift and partition indices of RIBWindowAttention) in float64, merge(partition(x)) = x, the
gate's sigmoid and product, the zero columns of padded rows, strided inputs, access widths, errors."""
import pytest
import torch

from rfsr_cuda.nn.attention import _window_indices
from rfsr_cuda.ops import cuda_kernels_built, window_merge, window_partition

OPS = torch.ops.rfsr
cuda = pytest.mark.cuda

# (H, W), window, shifted: windows that divide the image, padding on one or both sides, a rectangular window, a
# window larger than the image, 1x1 windows
GEOMETRIES = [((16, 24), (8, 8), False), ((13, 19), (8, 8), True), ((13, 19), (4, 6), False), ((10, 15), (4, 6), True),
              ((5, 7), (16, 16), False), ((9, 6), (1, 1), False), ((12, 12), (4, 4), True)]


def reference(windows, size, window, shifted, gate, out_width):
    """The merge as RIBWindowAttention gathers it (float64), times sigmoid(gate), into zero-padded rows."""
    (H, W), (wh, ww) = size, window
    nh, nw = -(-H // wh), -(-W // ww)
    C = windows.shape[-1]
    _, _, win_r, win_c, off_r, off_c = _window_indices(H, W, wh, ww, shifted, windows.device)
    merged = windows.double().reshape(-1, nh, nw, wh, ww, C)[:, win_r, win_c, off_r, off_c]
    if gate is not None:
        merged = torch.sigmoid(gate[..., :C].double()) * merged
    out = merged.new_zeros(*merged.shape[:3], out_width)
    out[..., :C] = merged
    return out


def partition_reference(x, window, shifted, channels):
    """pad + shift + partition as RIBWindowAttention gathers it."""
    (H, W), (wh, ww) = x.shape[1:3], window
    rows, cols = _window_indices(H, W, wh, ww, shifted, x.device)[:2]
    return x[:, rows, cols][..., :channels].reshape(-1, wh * ww, channels)


def make(B, C, size, window, shifted, dtype, device, *, gate_width=None, token_pad=0):
    (H, W), (wh, ww) = size, window
    n = B * (-(-H // wh)) * (-(-W // ww))
    windows = torch.randn(n, wh * ww, C + token_pad, dtype=dtype, device=device)[..., :C]  # strided tokens if padded
    gate = None if gate_width is None else 3 * torch.randn(B, H, W, gate_width, dtype=dtype, device=device)
    shift = (wh // 2, ww // 2) if shifted else (0, 0)
    return windows, gate, shift


def check(windows, size, window, shifted, gate, out_width):
    shift = (window[0] // 2, window[1] // 2) if shifted else (0, 0)
    got = window_merge(windows, size, window, shift, gate, out_width)
    assert got.dtype == windows.dtype and got.is_contiguous() and got.shape[-1] == out_width
    ref = reference(windows, size, window, shifted, gate, out_width)
    assert got.shape == ref.shape
    tol = {torch.float64: 0.0, torch.float32: 1e-6, torch.bfloat16: 1e-2, torch.float16: 2e-3}[windows.dtype]
    if ref.numel():
        err = (got.double() - ref).abs().max().item()
        assert err <= tol * ref.abs().max().clamp_min(1).item(), err
    return got


@pytest.mark.parametrize("size, window, shifted", GEOMETRIES)
@pytest.mark.parametrize("gated, extra", [(False, 0), (True, 0), (True, 3), (False, 5)])
def test_cpu_matches_the_model_gathers(size, window, shifted, gated, extra):
    C = 6
    windows, gate, _ = make(2, C, size, window, shifted, torch.float64, "cpu", gate_width=C + extra if gated else None,
                            token_pad=2)
    check(windows, size, window, shifted, gate, C + extra)


@pytest.mark.parametrize("size, window, shifted", GEOMETRIES)
@pytest.mark.parametrize("extra", [0, 5])
def test_partition_matches_the_model_gathers_and_merge_inverts_it(size, window, shifted, extra):
    if (-size[0] % window[0]) >= size[0] or (-size[1] % window[1]) >= size[1]:
        pytest.skip("too small for reflect padding")
    x = torch.randn(2, *size, 6 + extra, dtype=torch.float64)
    shift = (window[0] // 2, window[1] // 2) if shifted else (0, 0)
    got = window_partition(x, window, shift, 6)
    assert got.is_contiguous()
    torch.testing.assert_close(got, partition_reference(x, window, shifted, 6), rtol=0, atol=0)
    torch.testing.assert_close(window_merge(got, size, window, shift), x[..., :6], rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_rounds_where_the_unfused_ops_round(dtype):
    windows, gate, shift = make(3, 8, (13, 19), (8, 8), True, dtype, "cpu", gate_width=8)
    got = window_merge(windows, (13, 19), 8, shift, gate)
    _, _, win_r, win_c, off_r, off_c = _window_indices(13, 19, 8, 8, True, "cpu")
    merged = windows.reshape(3, 2, 3, 8, 8, 8)[:, win_r, win_c, off_r, off_c]
    torch.testing.assert_close(got, torch.sigmoid(gate) * merged, rtol=0, atol=0)


def test_empty_batch_and_defaults():
    out = window_merge(torch.ones(0, 16, 3), (4, 4), 4)
    assert out.shape == (0, 4, 4, 3)
    w = torch.arange(2 * 16 * 3, dtype=torch.float32).view(2, 16, 3)
    out = window_merge(w, (4, 8), 4)  # two windows side by side, no shift: a reshape
    torch.testing.assert_close(out[0], w.view(2, 4, 4, 3).permute(1, 0, 2, 3).reshape(4, 8, 3))


@pytest.mark.parametrize("call, exc, match", [
    (lambda x: window_partition(x[0], 4), ValueError, r"x must be 4-D \(B, H, W, G\)"),
    (lambda x: window_partition(x.int(), 4), TypeError, "x must be a floating-point"),
    (lambda x: window_partition(x, 16), ValueError, r"x is 6 x 7, too small for window \[16, 16\]"),
    (lambda x: window_partition(x, 4, (0, 8)), ValueError, r"shift must lie in \[0, padded size\)"),
    (lambda x: window_partition(x, 4, 0, 4), ValueError, r"channels must be in \[1, 3\]"),
    (lambda x: window_partition(x, (4, 0)), ValueError, "window must be two sizes >= 1"),
])
def test_partition_bad_input_is_a_clear_error(call, exc, match):
    x = torch.ones(2, 6, 7, 3)
    with pytest.raises(exc, match=match):
        call(x)
    with pytest.raises(exc, match=match):  # the fake kernel says the same
        call(x.to("meta"))


def test_partition_op_checks_match_the_python_ones():
    with pytest.raises(ValueError, match="too small for window"):
        OPS.window_partition(torch.ones(1, 6, 7, 3), [16, 16], [0, 0], 3)
    with pytest.raises(ValueError, match=r"channels must be in \[1, 3\]"):
        OPS.window_partition(torch.ones(1, 6, 7, 3), [4, 4], [0, 0], 0)


@pytest.mark.parametrize("call, exc, match", [
    (lambda w, g: window_merge(w[0], (8, 8), 4, 0, g), ValueError, r"windows must be 3-D"),
    (lambda w, g: window_merge(w.int(), (8, 8), 4, 0, None), TypeError, "windows must be a floating-point"),
    (lambda w, g: window_merge(w, (8, 8), 8, 0, None), ValueError, "wh \\* ww = 64 tokens per window"),
    (lambda w, g: window_merge(w[:3], (8, 8), 4, 0, None), ValueError, r"B \* 4 windows \(a 2 x 2 grid"),
    (lambda w, g: window_merge(w, (8, 8), 4, (8, 0), None), ValueError, r"shift must lie in \[0, padded size\)"),
    (lambda w, g: window_merge(w, (8, 8), 4, (-1, 0), None), ValueError, "shift must lie in"),
    (lambda w, g: window_merge(w, (8, 8), (4, 0), 0, None), ValueError, "window must be two sizes >= 1"),
    (lambda w, g: window_merge(w, (0, 8), 4, 0, None), ValueError, "height and width must be >= 1"),
    (lambda w, g: window_merge(w, (8, 8), 4, 0, g[..., :2]), ValueError, r"gate must be \(B, H, W, G\)"),
    (lambda w, g: window_merge(w, (8, 8), 4, 0, g.double()), TypeError, "gate has dtype"),
    (lambda w, g: window_merge(w, (8, 8), 4, 0, g, 2), ValueError, "out_width must be >= the 3 channels"),
    (lambda w, g: window_merge(w, (8, 8), 4.0, 0, g), TypeError, "window must be an int or two ints"),
])
def test_bad_input_is_a_clear_error(call, exc, match):
    w, g = torch.ones(8, 16, 3), torch.ones(2, 8, 8, 3)
    with pytest.raises(exc, match=match):
        call(w, g)
    with pytest.raises(exc, match=match):  # the fake kernel says the same
        call(w.to("meta"), g.to("meta"))


def test_op_checks_match_the_python_ones():
    with pytest.raises(ValueError, match=r"B \* 4 windows"):
        OPS.window_merge(torch.ones(3, 16, 3), 8, 8, [4, 4], [0, 0], None, 3)
    with pytest.raises(ValueError, match="out_width must be >= the 3 channels"):
        OPS.window_merge(torch.ones(8, 16, 3), 8, 8, [4, 4], [0, 0], None, 2)


def test_meta_opcheck_and_compile():
    windows, gate, shift = make(2, 8, (13, 19), (8, 8), True, torch.float32, "cpu", gate_width=12)
    tests = ("test_schema", "test_faketensor", "test_aot_dispatch_static")
    torch.library.opcheck(OPS.window_partition.default, (gate, [8, 8], list(shift), 8), test_utils=tests)
    torch.library.opcheck(OPS.window_merge.default, (windows, 13, 19, [8, 8], list(shift), gate, 16), test_utils=tests)
    fn = torch.compile(lambda w, g: window_merge(w, (13, 19), 8, shift, g, 16), fullgraph=True)
    torch.testing.assert_close(fn(windows, gate), window_merge(windows, (13, 19), 8, shift, gate, 16))


# ---- CUDA (the kernel in csrc/merge) ---------------------------------------------------------------------------

def _cuda_kernel_built():
    return cuda_kernels_built("window_partition", "window_merge")


@cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("size, window, shifted", [g for g in GEOMETRIES if g[0] != (5, 7)]
                         + [((180, 320), (64, 64), True), ((90, 160), (16, 16), False)])
@pytest.mark.parametrize("G, channels", [(544, 540), (192, 180), (48, 48), (7, 5)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_cuda_partition_matches_reference(size, window, shifted, G, channels, dtype):
    if not _cuda_kernel_built():
        pytest.skip("extension built without CUDA kernels")
    x = torch.randn(2, *size, G, dtype=dtype, device="cuda")
    shift = (window[0] // 2, window[1] // 2) if shifted else (0, 0)
    got = window_partition(x, window, shift, channels)
    torch.testing.assert_close(got, partition_reference(x, window, shifted, channels), rtol=0, atol=0)
    odd = torch.randn(2 * size[0] * size[1] * G + 1, dtype=dtype, device="cuda")[1:].view(2, *size, G)
    torch.testing.assert_close(window_partition(odd, window, shift, channels),  # unaligned rows: narrow accesses
                               partition_reference(odd, window, shifted, channels), rtol=0, atol=0)
    nchw = x.permute(0, 3, 1, 2).contiguous().permute(0, 2, 3, 1)  # not pixel rows: copied first
    torch.testing.assert_close(window_partition(nchw, window, shift, channels), got, rtol=0, atol=0)


@cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("size, window, shifted", GEOMETRIES + [((180, 320), (64, 64), True), ((90, 160), (16, 16), False)])
@pytest.mark.parametrize("C, gate_width, out_width", [(180, 184, 184), (60, 64, 64), (16, None, 16), (30, 32, 30),
                                                      (5, 5, 8)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_cuda_matches_reference(size, window, shifted, C, gate_width, out_width, dtype):
    if not _cuda_kernel_built():
        pytest.skip("extension built without CUDA kernels")
    windows, gate, shift = make(2, C, size, window, shifted, dtype, "cuda", gate_width=gate_width)
    got = check(windows, size, window, shifted, gate, out_width)
    again = window_merge(windows, size, window, shift, gate, out_width)
    torch.testing.assert_close(again, got, rtol=0, atol=0)  # deterministic
    cpu = window_merge(windows.cpu(), size, window, shift, None if gate is None else gate.cpu(), out_width)
    # the ATen route on the same values: a rounding step or two apart (expf vs the CPU's exp, then the product)
    step = {torch.bfloat16: 2.0 ** -7, torch.float16: 2.0 ** -10, torch.float32: 2.0 ** -20}[dtype]  # fast-math expf
    diff = (got.cpu().double() - cpu.double()).abs()
    assert (diff <= 2 * step * cpu.double().abs() + 1e-30).all(), diff.max().item()


@cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_strided_offsets_float64_and_poison():
    if not _cuda_kernel_built():
        pytest.skip("extension built without CUDA kernels")
    for token_pad in (0, 1, 8):  # token rows of C + pad elements: 2-byte, 16-byte strides
        windows, gate, _ = make(2, 24, (13, 19), (8, 8), True, torch.bfloat16, "cuda", gate_width=32,
                                token_pad=token_pad)
        check(windows, (13, 19), (8, 8), True, gate, 32)
    buf = torch.randn(2 * 13 * 19 * 24 + 1, dtype=torch.bfloat16, device="cuda")
    gate = buf[1:].view(2, 13, 19, 24)  # a 2-byte offset: 1-element accesses
    windows, _, _ = make(2, 24, (13, 19), (8, 8), True, torch.bfloat16, "cuda")
    check(windows, (13, 19), (8, 8), True, gate, 24)
    gate_nchw = torch.randn(2, 24, 13, 19, dtype=torch.bfloat16, device="cuda").permute(0, 2, 3, 1)  # not rows
    check(windows, (13, 19), (8, 8), True, gate_nchw, 24)
    # every output element is written: a freed NaN block of the same size is what the allocator hands out next
    poison = torch.full((2, 13, 19, 40), float("nan"), dtype=torch.bfloat16, device="cuda")
    del poison
    out = window_merge(windows, (13, 19), 8, (4, 4), gate, 40)
    assert torch.isfinite(out).all() and out[..., 24:].abs().max().item() == 0
    wd, gd, _ = make(2, 6, (13, 19), (8, 8), True, torch.float64, "cuda", gate_width=6)  # float64: the ATen route
    check(wd, (13, 19), (8, 8), True, gd, 8)
