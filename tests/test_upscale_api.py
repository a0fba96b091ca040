"""rfsr_cuda.upscale on CPU with tiny real SST models: tiling = untiled with one tile shape per image, OOM halving,
fp16 NaN redo, TTA, Lanczos outscale, image formats (16-bit, grey, alpha, metadata)."""
import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from rfsr_cuda.image_io import read_image, write_image
from rfsr_cuda.models import create_model
from rfsr_cuda.upscale import Upscaler, axis_weights, plan_axis, resize_lanczos, upscale_image_file

TINY = dict(dim=12, window_sizes=[4, 8], num_heads=[2, 2], ranks=[4, 4], n_blocks=1, exp_ratio=1.5,
            rib_hidden_dim=8, rib_n_freqs=4, upsampler_type="pixelshuffle_direct", gate_type="DWC")


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = create_model("sst_light", upscaling_factor=2, **TINY).eval()
    with torch.no_grad():  # away from the plain nearest-neighbour skip, still a smooth function
        for p in m.parameters():
            p.add_(0.01 * torch.randn_like(p))
    return m


class Wrapped(nn.Module):
    """A real model with injected faults; exposes the config the Upscaler reads."""

    def __init__(self, inner, fault):
        super().__init__()
        self.inner, self.fault, self.config, self.calls = inner, fault, inner.config, []

    @property
    def min_input_size(self):
        return self.inner.min_input_size

    def forward(self, x):
        self.calls.append(tuple(x.shape))
        out = self.fault(x)
        return self.inner(x) if out is None else out


class PerPixel(nn.Module):
    """A ×2 model without spatial context (nearest upsampling of a per-pixel colour map)."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.tensor([0.9, 0.8, 0.7]))
        self.config = type("Cfg", (), {"upscaling_factor": 2, "window_sizes": (8,)})()
        self.min_input_size = 1

    def forward(self, x):
        y = torch.sin(3 * x) * self.w[:, None, None] * 0.5 + 0.25
        return torch.nn.functional.interpolate(y, scale_factor=2, mode="nearest")


def test_plan_axis_aligned_and_covering():
    for length in (70, 77, 96, 200, 33):
        tiles = plan_axis(length, 32, 16, 8)
        assert tiles[0][0] == 0 and tiles[-1][0] + tiles[-1][1] == length
        assert all(o % 8 == 0 for o, _ in tiles)  # window layouts match the whole image's
        assert all(size == 32 for _, size in tiles[:-1]) and 24 < tiles[-1][1] <= 32
        for (o1, s1), (o2, _) in zip(tiles, tiles[1:]):
            assert o1 + s1 - o2 >= 16  # at least the overlap
        ws = axis_weights(tiles, 2)
        total = torch.zeros(2 * length)
        for (o, size), w in zip(tiles, ws):
            total[2 * o:2 * (o + size)] += w
        assert bool((total > 0.5).all())
    assert plan_axis(20, 32, 16, 8) == [(0, 20)]


def test_tiled_equals_untiled(model):
    torch.manual_seed(1)
    img = torch.rand(3, 90, 110)
    ref = Upscaler(model, tile=0).upscale(img)
    assert ref.shape == (3, 180, 220)
    w = Wrapped(model, lambda x: None)
    up = Upscaler(w, tile=48, overlap=24, tile_batch=3)
    plan = up.plan(90, 110)
    assert plan.shape == (48, 48) and len(plan) == up.count_tiles(90, 110) == 12
    assert plan.ys[-1][1] < 48 and plan.xs[-1][1] < 48  # the edge tiles hold fewer pixels ...
    out = up.upscale(img)
    assert (out - ref).abs().max().item() < 1e-3
    assert {s[1:] for s in w.calls} == {(3, 48, 48)}  # ... but every tile runs at the one shape
    assert up.stats.forwards == len(w.calls) < up.count_tiles(90, 110)  # tiles were batched


def test_partial_tiles_equal_the_part_alone(model):
    """A tile whose pixels fill only its top-left part gives there what the part alone gives (the model's own
    edge handling), whatever lies beyond it, batched with full tiles, with and without TTA."""
    g = torch.Generator().manual_seed(6)
    valid = [(40, 29), (48, 48), (21, 48), (5, 13)]
    x = torch.rand(len(valid), 3, 48, 48, generator=g)  # beyond the valid parts: unrelated pixels
    for tta in (False, True):
        up = Upscaler(model, tile=0, tta=tta)
        out = up.forward_tiles(x, valid)
        assert out.shape == (4, 3, 96, 96)
        for i, (vh, vw) in enumerate(valid):
            alone = up.forward_tiles(x[i:i + 1, :, :vh, :vw].contiguous())[0]
            torch.testing.assert_close(out[i, :, :2 * vh, :2 * vw], alone, rtol=0, atol=2e-6)
            assert out[i, :, 2 * vh:].abs().sum() == 0 and out[i, :, :, 2 * vw:].abs().sum() == 0


def test_prepared_model_keeps_the_valid_region_exact(model):
    """SST.prepare_inference's fused ops (LayerNorm, depthwise convs, padded channels) step aside while the tiler's
    valid-region hooks are on, so partial tiles still equal the part alone, and tiled still equals untiled."""
    import copy
    fast = copy.deepcopy(model).prepare_inference(torch.float32)
    assert fast.body[0][0].attn.width == 16  # dim 12 padded
    g = torch.Generator().manual_seed(7)
    valid = [(40, 29), (48, 48), (5, 13)]
    x = torch.rand(len(valid), 3, 48, 48, generator=g)
    up = Upscaler(fast, tile=0)
    out = up.forward_tiles(x, valid)
    for i, (vh, vw) in enumerate(valid):
        alone = up.forward_tiles(x[i:i + 1, :, :vh, :vw].contiguous())[0]
        torch.testing.assert_close(out[i, :, :2 * vh, :2 * vw], alone, rtol=0, atol=2e-6)
        plain = Upscaler(model, tile=0).forward_tiles(x[i:i + 1, :, :vh, :vw].contiguous())[0]
        torch.testing.assert_close(alone, plain, rtol=0, atol=2e-5)  # the same function as the plain model
    img = torch.rand(3, 90, 110, generator=g)
    tiled = Upscaler(fast, tile=48, overlap=24, tile_batch=3).upscale(img)
    assert (tiled - Upscaler(fast, tile=0).upscale(img)).abs().max().item() < 1e-3


def test_prepared_copy_runs_low_precision_and_the_model_stays_as_given(model):
    """prepared=True: tiles run on a prepare_inference copy in the chosen precision (bf16 here, on the CPU ops), the
    float32 model is left untouched for the NaN redo; the output agrees with float32 to bf16 accuracy."""
    g = torch.Generator().manual_seed(11)
    img = torch.rand(3, 40, 52, generator=g)
    shapes = {n: p.shape for n, p in model.named_parameters()}
    expect = Upscaler(model, tile=0, precision="fp32").upscale(img)
    up = Upscaler(model, tile=32, overlap=16, precision="bf16", prepared=True)
    fast = up.runner(torch.bfloat16)
    assert fast is not model and up.runner(torch.float32) is model
    assert fast.proj.weight.dtype == torch.bfloat16 and fast.body[0][0].attn.width == 16  # dim 12 padded
    assert {n: p.shape for n, p in model.named_parameters()} == shapes and model.proj.weight.dtype == torch.float32
    out = up.upscale(img)
    assert up.runner(torch.bfloat16) is fast  # made once
    d = (out - expect).abs()
    assert d.max().item() < 3e-2 and d.mean().item() < 3e-3
    # the autocast route of the same precision is a different computation (float32 residual stream)
    plain = Upscaler(model, tile=32, overlap=16, precision="bf16", prepared=False)
    assert plain.runner(torch.bfloat16) is model
    assert (plain.upscale(img) - out).abs().max().item() > 0


def test_prepared_defaults_and_errors(model):
    assert not Upscaler(model, device="cpu").prepared  # CPU, float32: the model as given
    assert not Upscaler(model, device="cpu", precision="bf16").prepared  # only CUDA takes it by default
    with pytest.raises(ValueError, match="prepare_inference"):
        Upscaler(PerPixel(), prepared=True)
    assert not Upscaler(PerPixel(), precision="bf16").prepared


def test_prepared_nan_tile_is_redone_with_the_float32_model(model):
    """A non-finite tile of the prepared low-precision copy is redone by the float32 model as given."""
    torch.manual_seed(3)
    img = torch.rand(3, 40, 50)
    expect = Upscaler(model, tile=16, overlap=8, precision="fp32").upscale(img)
    up = Upscaler(model, tile=16, overlap=8, precision="bf16", prepared=True)
    fast = up.runner(torch.bfloat16)
    fast.register_forward_hook(lambda m, args, out: torch.full_like(out, float("nan")))
    out = up.upscale(img)
    assert up.stats.fp32_redos == up.count_tiles(40, 50)
    torch.testing.assert_close(out, expect, rtol=0, atol=1e-6)


def test_small_images_run_whole_and_big_ones_in_one_shape(model):
    g = torch.Generator().manual_seed(7)
    w = Wrapped(model, lambda x: None)
    up = Upscaler(w, tile=32, overlap=16, tile_batch=4)
    assert up.tile == 32 and up.min_tile == 16  # multiples of the alignment (8 here)
    small = torch.rand(3, 27, 31, generator=g)  # fits in one tile: the image itself, untiled
    assert up.plan(27, 31).tile is None
    torch.testing.assert_close(up.upscale(small), Upscaler(model, tile=0).upscale(small), rtol=0, atol=0)
    assert w.calls == [(1, 3, 27, 31)]
    w.calls.clear()
    thin = torch.rand(3, 19, 100, generator=g)  # shorter than a tile on one axis only: still 32×32 tiles
    plan = up.plan(19, 100)
    assert plan.shape == (32, 32) and plan.ys == ((0, 19),) and len(plan) == 6
    d = (up.upscale(thin) - Upscaler(model, tile=0).upscale(thin)).abs().max().item()
    assert d < 1e-3 and {s[1:] for s in w.calls} == {(3, 32, 32)}
    w.calls.clear()
    tiny = torch.rand(3, 3, 70, generator=g)  # below the model's minimum: padded first, as untiled
    out = up.upscale(tiny)
    assert out.shape == (3, 6, 140) and {s[1:] for s in w.calls} == {(3, 32, 32)}
    assert (out - Upscaler(model, tile=0).upscale(tiny)).abs().max().item() < 1e-3


def test_oom_batch_then_tile_halving(model):
    torch.manual_seed(2)
    img = torch.rand(3, 48, 60)
    plain = Upscaler(model, tile=32, overlap=16, tile_batch=1)
    expect = plain.upscale(img)

    def oom_for_batches(x):
        if x.shape[0] > 1:
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")

    w = Wrapped(model, oom_for_batches)
    up = Upscaler(w, tile=32, overlap=16, tile_batch=4)
    out = up.upscale(img)
    assert up.tile_batch == 1 and up.stats.oom_retries >= 1
    torch.testing.assert_close(out, expect, rtol=0, atol=1e-6)  # the same tiles, one at a time

    def oom_for_big(x):
        if max(x.shape[-2:]) > 16:
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")

    w = Wrapped(model, oom_for_big)
    up = Upscaler(w, tile=32, overlap=16, tile_batch=1)
    out = up.upscale(img)
    assert up.tile_size() == 16 and up.stats.tile_sizes == [16] and 16 % up.align == 0
    assert {s[-2:] for s in w.calls[1:]} == {(16, 16)}  # after the first failure only small tiles, one shape
    d = (out - Upscaler(model, tile=0).upscale(img)).abs()
    assert d.max().item() < 0.1 and d.mean().item() < 5e-3  # 16-pixel tiles: less exact than 32, still close

    # with a per-pixel model every correct tiling is exact: a stale, misplaced or skipped tile would show
    local = Wrapped(PerPixel(), oom_for_big)
    up = Upscaler(local, tile=32, overlap=16, tile_batch=2)
    out = up.upscale(img)
    assert up.stats.tile_sizes == [16] and up.tile_batch == 1
    torch.testing.assert_close(out, PerPixel()(img[None])[0], rtol=0, atol=1e-6)

    def always_oom(x):
        raise torch.OutOfMemoryError("CUDA out of memory (injected)")

    with pytest.raises(torch.OutOfMemoryError):
        Upscaler(Wrapped(model, always_oom), tile=32).upscale(img)

    # a whole image that does not fit: halved to a multiple of the alignment, then tiled
    w = Wrapped(model, oom_for_big)
    up = Upscaler(w, tile=0)
    out = up.upscale(img[:, :20, :24])
    assert up.stats.tile_sizes == [16] and {s[-2:] for s in w.calls[1:]} == {(16, 16)}
    d = (out - Upscaler(model, tile=0).upscale(img[:, :20, :24])).abs()
    assert d.max().item() < 0.1 and d.mean().item() < 5e-3


def test_fp16_nan_tile_is_redone_in_fp32(model):
    torch.manual_seed(3)
    img = torch.rand(3, 40, 50)
    expect = Upscaler(model, tile=16, overlap=8, precision="fp32").upscale(img)

    def nan_in_low_precision(x):
        if torch.is_autocast_enabled("cpu"):
            return torch.full((x.shape[0], 3, 2 * x.shape[2], 2 * x.shape[3]), float("nan"))

    w = Wrapped(model, nan_in_low_precision)
    up = Upscaler(w, tile=16, overlap=8, precision="fp16")
    out = up.upscale(img)
    assert up.stats.fp32_redos == up.count_tiles(40, 50)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, expect, rtol=0, atol=1e-6)


def test_tta_and_outscale_and_small_inputs(model):
    torch.manual_seed(4)
    arr = (torch.rand(20, 24, 3) * 255).round().to(torch.uint8).numpy()
    x = torch.from_numpy(arr).permute(2, 0, 1).float() / 255
    tta = Upscaler(model, tile=0, tta=True).upscale(x)
    plain = Upscaler(model, tile=0)
    manual = torch.zeros_like(tta)
    for k in range(4):
        for flip in (False, True):
            xi = torch.rot90(x.flip(-1) if flip else x, k, dims=(-2, -1))
            yi = torch.rot90(plain.upscale(xi.contiguous()), -k, dims=(-2, -1))
            manual += (yi.flip(-1) if flip else yi) / 8
    assert tta.shape == (3, 40, 48)
    torch.testing.assert_close(tta, manual, rtol=0, atol=1e-5)  # the average of the 8 symmetric predictions
    out = Upscaler(model, tile=0).upscale_array(arr, outscale=3.0)
    assert out.shape == (60, 72, 3) and out.dtype == np.uint8
    net = Upscaler(model, tile=0).upscale(x)  # -s: Pillow's Lanczos on the float network output, per channel
    direct = np.stack([np.asarray(Image.fromarray(c).resize((72, 60), Image.Resampling.LANCZOS))
                       for c in net.numpy()], axis=2)
    np.testing.assert_array_equal(out, (np.clip(direct, 0, 1) * 255).round().astype(np.uint8))
    bicubic = torch.nn.functional.interpolate(net[None], size=(60, 72), mode="bicubic", align_corners=False)[0]
    assert np.abs(out.astype(int) - (bicubic.clamp(0, 1) * 255).round().permute(1, 2, 0).numpy()).max() >= 1
    tiny = Upscaler(model, tile=0).upscale_array(arr[:3, :2])  # smaller than the model's minimum input
    assert tiny.shape == (6, 4, 3)


def _ramp16(h, w, c, seed=0):
    rng = np.random.default_rng(seed)
    base = np.linspace(0, 65535, w)[None, :, None] * np.linspace(0.2, 1, h)[:, None, None]
    return np.clip(base + rng.integers(-300, 300, (h, w, c)), 0, 65535).astype(np.uint16)


@pytest.mark.parametrize("name,channels", [("rgb16.png", 3), ("rgba16.png", 4), ("grey16.png", 1),
                                           ("rgb16.tif", 3)])
def test_16bit_round_trip(model, tmp_path, name, channels):
    if name.endswith(".tif"):
        pytest.importorskip("tifffile")
    elif channels > 1:
        pytest.importorskip("imageio_ffmpeg")  # decodes 16-bit colour PNGs, which Pillow reduces to 8 bits
    arr = _ramp16(18, 22, channels)
    if channels == 4:
        arr[..., 3] = np.linspace(0, 65535, 22, dtype=np.uint16)[None, :]
    src, dst = tmp_path / name, tmp_path / ("out_" + name)
    write_image(arr, src)
    back, info = read_image(src)
    np.testing.assert_array_equal(back, arr)  # the writer and reader keep all 16 bits
    assert info.bits == 16 and info.has_alpha == (channels == 4) and info.grayscale == (channels == 1)
    up = Upscaler(model, tile=0)
    upscale_image_file(up, src, dst)
    out, oinfo = read_image(dst)
    assert out.dtype == np.uint16 and out.shape == (36, 44, channels) and oinfo.bits == 16
    np.testing.assert_array_equal(out, up.upscale_array(arr))
    assert len(np.unique(out[..., 0])) > 256  # not 8-bit values stretched


def test_outscale_lanczos_16bit_and_alpha(model):
    arr = _ramp16(18, 22, 4, seed=3)
    arr[..., 3] = np.linspace(0, 65535, 22, dtype=np.uint16)[None, :]
    up = Upscaler(model, tile=0)
    out = up.upscale_array(arr, outscale=1.5)  # a shrink after the ×2 network
    assert out.shape == (27, 33, 4) and out.dtype == np.uint16
    planes = torch.from_numpy(arr).permute(2, 0, 1)  # as upscale_array reads them (the same memory layout, so the
    net = torch.cat([up.upscale(planes[:3].float().div_(65535)),  # same last bits)
                     up.upscale(planes[3:].float().div_(65535).expand(3, -1, -1)).mean(0, keepdim=True)])
    direct = np.stack([np.asarray(Image.fromarray(c).resize((33, 27), Image.Resampling.LANCZOS))
                       for c in net.numpy()], axis=2)
    np.testing.assert_array_equal(out, (np.clip(direct, 0, 1) * 65535).round().astype(np.uint16))
    assert len(np.unique(out[..., 0])) > 256  # full 16-bit depth, not 8-bit values stretched
    torch.testing.assert_close(resize_lanczos(net, (27, 33)), torch.from_numpy(direct).permute(2, 0, 1).clamp(0, 1))


def test_alpha_and_grey_and_metadata(model, tmp_path):
    rng = np.random.default_rng(5)
    rgba = rng.integers(0, 256, (16, 20, 4), dtype=np.uint8)
    rgba[..., 3] = np.linspace(0, 255, 20, dtype=np.uint8)[None, :]
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    up = Upscaler(model, tile=0)
    upscale_image_file(up, tmp_path / "a.png", tmp_path / "a_out.png")
    with Image.open(tmp_path / "a_out.png") as im:
        assert im.mode == "RGBA" and im.size == (40, 32)
        got = np.asarray(im)
    alpha_model = up.upscale_array(np.repeat(rgba[..., 3:], 3, axis=2))  # alpha through the network as grey
    assert np.abs(got[..., 3].astype(int) - alpha_model.mean(2)).max() <= 1
    bic = Upscaler(model, tile=0, alpha="bicubic").upscale_array(rgba)
    assert bic.shape == (32, 40, 4)
    assert np.abs(np.diff(bic[..., 3].astype(int), axis=0)).max() <= 1  # the horizontal ramp, interpolated

    la = np.stack([rgba[..., 0], rgba[..., 3]], axis=2)
    Image.fromarray(la, "LA").save(tmp_path / "la.png")
    upscale_image_file(up, tmp_path / "la.png", tmp_path / "la_out.png")
    with Image.open(tmp_path / "la_out.png") as im:
        assert im.mode == "LA" and im.size == (40, 32)

    # EXIF and ICC profile carried over (JPEG in, JPEG out)
    from PIL import ImageCms
    icc = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    exif = Image.Exif()
    exif[0x010F] = "rfsr-test-camera"  # Make
    exif[0x0112] = 6  # orientation: rotate 90° clockwise
    Image.fromarray(rgba[..., :3], "RGB").save(tmp_path / "m.jpg", exif=exif.tobytes(), icc_profile=icc,
                                               quality=95)
    upscale_image_file(up, tmp_path / "m.jpg", tmp_path / "m_out.jpg")
    with Image.open(tmp_path / "m_out.jpg") as im:
        assert im.size == (32, 40)  # orientation applied (20×16 stored, rotated)
        assert im.info.get("icc_profile") == icc
        ex = im.getexif()
        assert ex.get(0x010F) == "rfsr-test-camera" and ex.get(0x0112, 1) == 1


def test_auto_tile_picks_the_least_wasteful_size(model):
    up = Upscaler(model, tile="auto", overlap=8)
    assert up.tile_size() >= 256 and up.count_tiles(70, 90) == 1  # CPU: whole small images
    up.auto_tile = lambda: 40  # as if free device memory allowed 40-pixel tiles
    th, tw, ov = up.tile_dims(70, 90)
    assert th == tw and th % 8 == 0 and 16 <= th <= 40 and ov == 8
    cost = lambda t: sum(s for _, s in plan_axis(70, t, 8, 8)) * sum(s for _, s in plan_axis(90, t, 8, 8))  # noqa
    assert cost(th) == min(cost(t) for t in (16, 24, 32, 40))


@pytest.mark.cuda
@pytest.mark.parametrize("precision, mean_tol", [("bf16", 3e-3), ("fp16", 1e-3)])
def test_prepared_copy_on_cuda_with_the_bundled_weights(precision, mean_tol):
    """On CUDA bf16/fp16 tiles run on the prepared copy by default (fused ops, padded rows), edge tiles included;
    the result stays within low-precision error of the float32 model."""
    from rfsr_cuda.upscale import find_bundled_weights, load_model

    model = load_model(find_bundled_weights(2), "cuda")
    g = torch.Generator().manual_seed(5)
    yy, xx = torch.meshgrid(torch.arange(150.0), torch.arange(197.0), indexing="ij")
    img = (0.5 + 0.3 * torch.sin(xx / 9)[None] * torch.cos(yy / 13)[None]
           + 0.08 * torch.rand(3, 150, 197, generator=g)).clamp(0, 1)
    expect = Upscaler(model, tile=128, overlap=64, precision="fp32").upscale(img)
    up = Upscaler(model, tile=128, overlap=64, precision=precision)
    assert up.prepared and up.runner(up.dtype) is not model
    out = up.upscale(img)
    assert up.stats.fp32_redos == 0 and len(up.plan(150, 197)) > 1
    d = (out - expect).abs()
    assert d.mean().item() < mean_tol and d.max().item() < 0.1, (d.mean().item(), d.max().item())
