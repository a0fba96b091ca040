"""rfsr::layer_norm / rfsr::add_layer_norm on the CPU, Meta and (marked cuda) CUDA: values against a float64
LayerNorm, zero padding columns, the residual sum, strided rows, fallbacks, errors."""
import pytest
import torch
import torch.nn.functional as F

from rfsr_cuda.ops import cuda_kernels_built, layer_norm_padded

OPS = torch.ops.rfsr
cuda = pytest.mark.cuda


def reference(x, w, b, eps, width, y=None):
    """float64 LayerNorm of x (+ y rounded to x's dtype), zero-padded to width; the sum when y is given."""
    s = x if y is None else (x + y)
    n = F.layer_norm(s.double(), (x.shape[-1],), w.double(), b.double(), eps)
    n = F.pad(n, (0, width - x.shape[-1]))
    return n, s


def make(shape, dtype, device, *, param_dtype=None, pad_rows=0):
    """x (rows of C = shape[-1]) as a view of rows with `pad_rows` extra columns when > 0; weight, bias."""
    C = shape[-1]
    full = torch.randn(*shape[:-1], C + pad_rows, dtype=dtype, device=device) * 3 + 1
    x = full[..., :C]
    w = torch.randn(C, dtype=param_dtype or dtype, device=device)
    b = torch.randn(C, dtype=param_dtype or dtype, device=device)
    return x, w, b


def check(x, w, b, eps, width, y=None):
    out = layer_norm_padded(x, w, b, eps, width, residual=y)
    if y is not None:
        out, s = out
    ref, ref_s = reference(x, w, b, eps, width, y)
    C = x.shape[-1]
    assert out.shape == (*x.shape[:-1], width) and out.dtype == x.dtype and out.is_contiguous()
    if out.numel() == 0:
        return out
    assert (out[..., C:] == 0).all()  # padding columns written as zeros
    tol = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 4e-3}[x.dtype]
    err = (out[..., :C].double() - ref[..., :C]).abs().max().item()
    scale = ref.abs().max().clamp_min(1).item()
    assert err <= tol * scale, (err, scale)
    if y is not None:
        assert s.shape == x.shape and s.is_contiguous()
        torch.testing.assert_close(s, ref_s, rtol=0, atol=0)  # x + y in x's dtype, bit for bit
    return out


CPU_CASES = [  # shape, width, pad_rows
    ((7, 5), 5, 0),
    ((2, 3, 4, 180), 184, 4),
    ((3, 48), 64, 0),
    ((1, 1), 8, 0),
    ((2, 0, 6), 8, 0),
]


@pytest.mark.parametrize("shape, width, pad_rows", CPU_CASES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("residual", [False, True])
def test_cpu_matches_reference(shape, width, pad_rows, dtype, residual):
    x, w, b = make(shape, dtype, "cpu", pad_rows=pad_rows)
    y = make(shape, dtype, "cpu", pad_rows=3)[0] if residual else None
    check(x, w, b, 1e-6, width, y)


def test_cpu_float32_params_with_bf16_rows_and_non_uniform_strides():
    x = torch.randn(4, 6, 40, dtype=torch.bfloat16).transpose(0, 1)  # rows that do not collapse to one stride
    w, b = torch.randn(40), torch.randn(40)
    check(x, w, b, 1e-5, 48)


def prefix_reference(x, w, b, eps, width, n, y=None):
    """float64: every column normalised with the mean and variance of the first n, then scaled; zero past C."""
    s = (x if y is None else x + y).double()
    head = s[..., :n]
    mean = head.mean(-1, keepdim=True)
    var = (head - mean).square().mean(-1, keepdim=True)
    out = (s - mean) / torch.sqrt(var + eps) * w.double() + b.double()
    return F.pad(out, (0, width - x.shape[-1]))


def check_prefix(x, w, b, eps, width, n, y=None, tol=None):
    out = layer_norm_padded(x, w, b, eps, width, residual=y, norm_cols=n)
    if y is not None:
        out, s = out
        torch.testing.assert_close(s, x + y, rtol=0, atol=0)
    ref = prefix_reference(x, w, b, eps, width, n, y)
    assert out.shape == ref.shape and out.dtype == x.dtype
    tol = tol or {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 4e-3}[x.dtype]
    assert (out.double() - ref).abs().max().item() <= tol * ref.abs().max().clamp_min(1).item()
    return out


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("residual", [False, True])
def test_cpu_norm_cols_takes_the_statistics_of_a_prefix(dtype, residual):
    # arbitrary values past n (the op does not assume zeros there) ...
    x, w, b = make((3, 5, 184), dtype, "cpu", pad_rows=8)
    y = make((3, 5, 184), dtype, "cpu")[0] if residual else None
    check_prefix(x, w, b, 1e-6, 192, 180, y)
    # ... and the padded layout it is for: zero channels with zero weights stay zero, the real ones equal a plain
    # LayerNorm of the first 180
    x = F.pad(x[..., :180], (0, 4))
    wp, bp = F.pad(w[:180], (0, 4)), F.pad(b[:180], (0, 4))
    out = layer_norm_padded(x, wp, bp, 1e-6, 184, norm_cols=180)
    assert (out[..., 180:] == 0).all()
    torch.testing.assert_close(out[..., :180], layer_norm_padded(x[..., :180], w[:180], b[:180], 1e-6, 180),
                               rtol=0, atol=1e-12 if dtype == torch.float64 else 1e-2)


def test_default_width_and_eps_reach_the_op():
    x, w, b = make((5, 9), torch.float32, "cpu")
    torch.testing.assert_close(layer_norm_padded(x, w, b), F.layer_norm(x, (9,), w, b))
    torch.testing.assert_close(layer_norm_padded(x, w, b, eps=0.5), F.layer_norm(x, (9,), w, b, eps=0.5))


@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(width=4), ValueError, "width must be >= x's last dim 5"),
    (dict(eps=-1.0), ValueError, "eps must be a finite number"),
    (dict(eps=float("nan")), ValueError, "eps must be a finite number"),
    (dict(weight=torch.ones(4)), ValueError, r"weight must have shape \[5\]"),
    (dict(bias=torch.ones(5, 1)), ValueError, r"bias must have shape \[5\]"),
    (dict(bias=torch.ones(5, dtype=torch.int32)), TypeError, "bias must be floating-point"),
    (dict(x=torch.ones(3, 5, dtype=torch.int64)), TypeError, "x must be a floating-point tensor"),
    (dict(x=torch.ones(3, 0)), ValueError, "x must have a non-empty last dim"),
    (dict(residual=torch.ones(3, 4)), ValueError, "residual must have the shape of x"),
    (dict(residual=torch.ones(3, 5, dtype=torch.float64)), TypeError, "residual has dtype"),
    (dict(width=5.0), TypeError, "width must be an int"),
    (dict(norm_cols=0), ValueError, "norm_cols must be between 1 and x's last dim 5, got 0"),
    (dict(norm_cols=6), ValueError, "norm_cols must be between 1 and x's last dim 5, got 6"),
    (dict(norm_cols=2.0), TypeError, "norm_cols must be an int or None"),
    (dict(x=[1.0]), TypeError, "x must be a torch.Tensor"),
])
@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_bad_input_is_a_clear_error(kwargs, exc, match, device):
    args = dict(x=torch.ones(3, 5), weight=torch.ones(5), bias=torch.zeros(5), eps=1e-6, width=8, residual=None)
    args.update(kwargs)
    if device == "meta":
        args = {k: v.to("meta") if isinstance(v, torch.Tensor) else v for k, v in args.items()}
    with pytest.raises(exc, match=match):
        layer_norm_padded(**args)


def test_meta_shapes_and_opcheck():
    x = torch.randn(2, 3, 30, device="meta")
    w, b = torch.randn(30, device="meta"), torch.randn(30, device="meta")
    assert OPS.layer_norm(x, w, b, 1e-6, 32).shape == (2, 3, 32)
    out, s = OPS.add_layer_norm(x, x, w, b, 1e-6, 32)
    assert out.shape == (2, 3, 32) and s.shape == (2, 3, 30)
    xc, wc, bc = make((4, 30), torch.float32, "cpu", pad_rows=2)
    tests = ("test_schema", "test_faketensor", "test_aot_dispatch_static")
    torch.library.opcheck(OPS.layer_norm.default, (xc, wc, bc, 1e-6, 32), test_utils=tests)
    torch.library.opcheck(OPS.add_layer_norm.default, (xc, xc.clone(), wc, bc, 1e-6, 32), test_utils=tests)
    torch.library.opcheck(OPS.add_layer_norm.default, (xc, xc.clone(), wc, bc, 1e-6, 32, 27), test_utils=tests)
    assert OPS.layer_norm(x, w, b, 1e-6, 32, 29).shape == (2, 3, 32)


def test_compiles_without_graph_breaks():
    x, w, b = make((3, 4, 20), torch.float32, "cpu")
    fn = torch.compile(lambda x, y: layer_norm_padded(x, w, b, 1e-6, 24, residual=y), fullgraph=True, dynamic=False)
    out, s = fn(x, x)
    ref_out, ref_s = layer_norm_padded(x, w, b, 1e-6, 24, residual=x)
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(s, ref_s)


# ---- CUDA (the kernel in csrc/layernorm) ------------------------------------------------------------------------

def _cuda_kernels_built():
    return cuda_kernels_built("layer_norm", "add_layer_norm")


CUDA_CASES = [  # shape, width, pad_rows (x a view of wider rows when > 0)
    ((1, 1), 1, 0),
    ((5, 3), 8, 0),  # odd C: 2-byte accesses
    ((3, 7, 30), 32, 2),
    ((2, 96, 160, 180), 184, 4),  # SST's rows, padded (8-byte accesses)
    ((2, 90, 130, 180), 180, 0),
    ((1000, 48), 48, 0),  # SST-light (16-byte accesses, 8 lanes a row)
    ((100003, 64), 72, 8),
    ((37, 224), 224, 0),
    ((9, 1000), 1008, 0),
    ((5, 2048), 2048, 0),  # 256 16-byte accesses: the widest the kernel takes
    ((3, 4100), 4104, 0),  # wider: the ATen fallback
    ((0, 16), 24, 0),
]


@cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("shape, width, pad_rows", CUDA_CASES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("param_f32", [False, True])
def test_cuda_matches_reference(shape, width, pad_rows, dtype, residual, param_f32):
    if not _cuda_kernels_built():
        pytest.skip("extension built without CUDA kernels")
    x, w, b = make(shape, dtype, "cuda", param_dtype=torch.float32 if param_f32 else None, pad_rows=pad_rows)
    y = make(shape, dtype, "cuda", pad_rows=6)[0] if residual else None
    first = check(x, w, b, 1e-6, width, y)
    again = layer_norm_padded(x, w, b, 1e-6, width, residual=y)
    torch.testing.assert_close(again[0] if residual else again, first, rtol=0, atol=0)  # deterministic


@cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("shape, n, width", [((2, 90, 130, 184), 180, 184), ((1000, 48), 45, 56), ((7, 33), 1, 40),
                                             ((5, 2048), 2000, 2048)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("residual", [False, True])
def test_cuda_norm_cols(shape, n, width, dtype, residual):
    if not _cuda_kernels_built():
        pytest.skip("extension built without CUDA kernels")
    x, w, b = make(shape, dtype, "cuda", param_dtype=torch.float32)
    y = make(shape, dtype, "cuda", pad_rows=8)[0] if residual else None
    check_prefix(x, w, b, 1e-6, width, n, y)


@cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_odd_offsets_and_float64_fallback():
    if not _cuda_kernels_built():
        pytest.skip("extension built without CUDA kernels")
    buf = torch.randn(50, 181, dtype=torch.bfloat16, device="cuda")
    x = buf[:, 1:]  # 2-byte-aligned rows: the narrowest accesses
    w, b = torch.randn(180, device="cuda"), torch.randn(180, device="cuda")
    check(x, w, b, 1e-6, 184, buf[:, :180])
    xd, wd, bd = make((6, 20), torch.float64, "cuda")
    check(xd, wd, bd, 1e-6, 24)
    wm = torch.randn(180, dtype=torch.float16, device="cuda")  # mixed parameter dtypes: the ATen route
    check(x, wm, b, 1e-6, 180)


@cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_graph_capture():
    if not _cuda_kernels_built():
        pytest.skip("extension built without CUDA kernels")
    x, w, b = make((64, 180), torch.bfloat16, "cuda")
    y = torch.randn_like(x)
    layer_norm_padded(x, w, b, 1e-6, 184, residual=y)  # warm-up outside the capture
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out, s = layer_norm_padded(x, w, b, 1e-6, 184, residual=y)
    x.copy_(torch.randn_like(x))
    g.replay()
    torch.cuda.synchronize()
    ref, ref_s = reference(x, w, b, 1e-6, 184, y)
    torch.testing.assert_close(s, ref_s, rtol=0, atol=0)
    assert (out[:, :180].double() - ref[:, :180]).abs().max() < 0.05
