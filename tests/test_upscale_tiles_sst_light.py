"""Tiled = untiled (within 1e-3) with the bundled SST-light ×2 weights on CPU: odd image sizes, one tile shape per
image (a multiple of the largest window, 64), edge tiles holding fewer pixels, several tiles per forward, and an
out-of-memory halving that keeps the tile a multiple of the alignment."""
import pytest
import torch

from rfsr_cuda.upscale import Upscaler, find_bundled_weights, load_model


@pytest.fixture(scope="module")
def sst_light():
    weights = find_bundled_weights(2)
    if weights is None:
        pytest.skip("this install bundles no sst_light_x2 weights")
    return load_model(weights, "cpu")


def _run(model, img, fault=None, **kwargs):
    """Upscale with an Upscaler, recording the shape of every model input (``fault`` may raise instead)."""
    shapes = []

    def record(_module, args):
        shapes.append(tuple(args[0].shape))
        if fault is not None:
            fault(args[0])

    handle = model.register_forward_pre_hook(record)
    try:
        up = Upscaler(model, **kwargs)
        plan = up.plan(*img.shape[-2:])
        out = up.upscale(img)
    finally:
        handle.remove()
    return up, plan, out, shapes


@pytest.mark.slow
@pytest.mark.parametrize("size,tile,tile_pad", [((97, 131), 32, None), ((150, 77), 48, 16)])
def test_sst_light_tiled_equals_untiled(sst_light, size, tile, tile_pad):
    img = torch.rand(3, *size, generator=torch.Generator().manual_seed(size[0]))
    ref = Upscaler(sst_light, tile=0).upscale(img)
    up, plan, out, shapes = _run(sst_light, img, tile=tile, overlap=tile_pad, tile_batch=4)
    assert up.align == 64 and plan.tile == 128 and plan.overlap == 64  # rounded up to the legal minimum
    assert len(plan) == 2 and min(v for _, v in plan.ys + plan.xs) < 128  # edge tiles hold fewer pixels ...
    assert set(shapes) == {(2, 3, 128, 128)}  # ... and still run at the one shape, both in one forward
    assert (out - ref).abs().max().item() < 1e-3


@pytest.mark.slow
def test_sst_light_3x3_tiles_after_an_oom_halving(sst_light):
    img = torch.rand(3, 193, 200, generator=torch.Generator().manual_seed(3))
    ref = Upscaler(sst_light, tile=0).upscale(img)

    def oom_above_128(x):
        if max(x.shape[-2:]) > 128:
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")

    up, plan, out, shapes = _run(sst_light, img, fault=oom_above_128, tile=256, tile_batch=4)
    assert plan.tile is None and shapes[0] == (1, 3, 193, 200)  # fits one 256 tile: tried whole first
    assert up.stats.tile_sizes == [128] and up.tile_size() % up.align == 0
    halved = up.plan(193, 200)
    assert (len(halved.ys), len(halved.xs)) == (3, 3) and halved.shape == (128, 128)
    assert {s[1:] for s in shapes[1:]} == {(3, 128, 128)} and len(shapes) - 1 == 3  # 9 tiles, 4 per forward
    assert (out - ref).abs().max().item() < 1e-3
