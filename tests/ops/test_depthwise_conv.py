"""rfsr::depthwise_conv3x3 on the CPU, Meta and (marked cuda) CUDA: values against a float64 depthwise conv with
bias, GELU and residual; layouts, access widths, errors."""
import pytest
import torch
import torch.nn.functional as F

from rfsr_cuda.ops import cuda_kernels_built, depthwise_conv3x3, depthwise_taps

OPS = torch.ops.rfsr
cuda = pytest.mark.cuda


FLAGS = [(False, False), (True, True), (True, False), (False, True)]  # (gelu, residual)


def reference(x, weight, bias, gelu, residual):
    y = F.conv2d(x.double(), weight.double(), None if bias is None else bias.double(), padding=1,
                 groups=x.shape[1])
    if gelu:
        y = F.gelu(y)
    return x.double() + y if residual else y


def make(B, C, H, W, dtype, device, *, channels_last=True):
    x = torch.randn(B, C, H, W, dtype=dtype, device=device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    weight = 0.5 * torch.randn(C, 1, 3, 3, device=device)
    bias = torch.randn(C, device=device)
    return x, weight, bias


def check(x, weight, bias, gelu, residual):
    got = depthwise_conv3x3(x, depthwise_taps(weight), bias, gelu=gelu, residual=residual)
    assert got.shape == x.shape and got.dtype == x.dtype
    assert got.is_contiguous(memory_format=torch.channels_last)
    ref = reference(x, weight, bias, gelu, residual)
    tol = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 3e-3}[x.dtype]
    if ref.numel():
        err = (got.double() - ref).abs().max().item()
        assert err <= tol * ref.abs().max().clamp_min(1).item(), err
    return got


@pytest.mark.parametrize("shape", [(2, 5, 7, 9), (1, 8, 1, 1), (1, 3, 4, 2), (0, 4, 3, 3)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("gelu, residual", FLAGS)
@pytest.mark.parametrize("channels_last", [True, False])
def test_cpu_matches_reference(shape, dtype, gelu, residual, channels_last):
    x, w, b = make(*shape, dtype, "cpu", channels_last=channels_last)
    check(x, w, b, gelu, residual)


def test_no_bias_and_taps_layout():
    x, w, _ = make(2, 6, 5, 5, torch.float64, "cpu")
    check(x, w, None, False, False)
    taps = depthwise_taps(w.double())
    assert taps.shape == (3, 3, 6) and taps.dtype == torch.float64
    assert taps[0, 2, 4] == w[4, 0, 0, 2]  # tap (row 0, column 2) of channel 4


@pytest.mark.parametrize("args, exc, match", [
    (dict(x=torch.ones(2, 3, 4)), ValueError, r"x must be 4-D \(B, C, H, W\)"),
    (dict(x=torch.ones(1, 4, 3, 3, dtype=torch.int32)), TypeError, "x must be a floating-point tensor"),
    (dict(taps=torch.ones(4, 3, 3)), ValueError, r"taps must have shape \[3, 3, 4\]"),
    (dict(taps=torch.ones(3, 3, 4, dtype=torch.int64)), TypeError, "taps must be floating-point"),
    (dict(bias=torch.ones(5)), ValueError, r"bias must have shape \[4\]"),
    (dict(bias=[0.0] * 4), TypeError, "bias must be a torch.Tensor"),
])
@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_bad_input_is_a_clear_error(args, exc, match, device):
    kw = dict(x=torch.ones(1, 4, 3, 3), taps=torch.ones(3, 3, 4), bias=torch.zeros(4))
    kw.update(args)
    if device == "meta":
        kw = {k: v.to("meta") if isinstance(v, torch.Tensor) else v for k, v in kw.items()}
    with pytest.raises(exc, match=match):
        depthwise_conv3x3(**kw)
    if device == "cpu" and not isinstance(kw["bias"], list):  # the op itself (C++ checks) says the same
        with pytest.raises(exc, match=match):
            OPS.depthwise_conv3x3(kw["x"], kw["taps"], kw["bias"])


def test_depthwise_taps_rejects_other_weights():
    with pytest.raises(ValueError, match=r"depthwise 3×3 conv weight \(C, 1, 3, 3\)"):
        depthwise_taps(torch.ones(4, 2, 3, 3))


def test_meta_opcheck_and_compile():
    x, w, b = make(2, 8, 5, 6, torch.float32, "cpu")
    taps = depthwise_taps(w)
    tests = ("test_schema", "test_faketensor", "test_aot_dispatch_static")
    torch.library.opcheck(OPS.depthwise_conv3x3.default, (x, taps, b, True, True), test_utils=tests)
    fn = torch.compile(lambda x: depthwise_conv3x3(x, taps, b, gelu=True, residual=True), fullgraph=True)
    torch.testing.assert_close(fn(x), depthwise_conv3x3(x, taps, b, gelu=True, residual=True))


# ---- CUDA (the kernel in csrc/dwconv) -------------------------------------------------------------------------

def _cuda_kernel_built():
    return cuda_kernels_built("depthwise_conv3x3")


CUDA_SHAPES = [(1, 1, 1, 1), (2, 3, 5, 7), (1, 232, 96, 96), (2, 184, 45, 80), (4, 72, 13, 17), (1, 48, 180, 320),
               (3, 6, 9, 4), (1, 16, 130, 3)]


@cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("shape", CUDA_SHAPES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("gelu, residual", FLAGS)
def test_cuda_matches_reference(shape, dtype, gelu, residual):
    if not _cuda_kernel_built():
        pytest.skip("extension built without CUDA kernels")
    x, w, b = make(*shape, dtype, "cuda")
    got = check(x, w, b, gelu, residual)
    again = depthwise_conv3x3(x, depthwise_taps(w), b, gelu=gelu, residual=residual)
    torch.testing.assert_close(again, got, rtol=0, atol=0)  # deterministic


@cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_layouts_offsets_and_float64():
    if not _cuda_kernel_built():
        pytest.skip("extension built without CUDA kernels")
    x, w, b = make(2, 12, 9, 11, torch.bfloat16, "cuda", channels_last=False)  # NCHW input: copied once
    check(x, w, b, True, True)
    check(x, w, None, False, False)
    buf = torch.randn(1 * 7 * 5 * 12 + 1, dtype=torch.bfloat16, device="cuda")
    odd = buf[1:].view(1, 7, 5, 12).permute(0, 3, 1, 2)  # channels-last at a 2-byte offset: 1-channel accesses
    check(odd, *make(1, 12, 7, 5, torch.bfloat16, "cuda")[1:], True, True)
    xd, wd, bd = make(1, 5, 6, 7, torch.float64, "cuda")  # float64: the ATen route
    check(xd, wd, bd, True, True)
