"""MATLAB-compatible bicubic imresize: hand-computed taps, borders, sizes, dtypes, and an independent cross-check."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from rfsr_cuda.imresize import bicubic_downsample, cubic_kernel, imresize, modcrop, resize_weights

# Keys' cubic (a = -0.5) at 0.25, 0.75, 1.25, 1.75, worked out by hand:
#   k(0.25) = 1.5/64 - 2.5/16 + 1 = 0.8671875        k(0.75) = 1.5·27/64 - 2.5·9/16 + 1 = 0.2265625
#   k(1.25) = -0.5·125/64 + 2.5·25/16 - 5 + 2 = -0.0703125   k(1.75) = -0.5·343/64 + 2.5·49/16 - 7 + 2 = -0.0234375
# ×2 down with antialiasing: h(d) = k(d/2)/2 at d = ±0.5, ±1.5, ±2.5, ±3.5, and these already sum to 1.
DOWN2 = np.array([-0.01171875, -0.03515625, 0.11328125, 0.43359375, 0.43359375, 0.11328125, -0.03515625, -0.01171875])


def test_cubic_kernel_values():
    x = np.array([0.0, 0.25, 0.75, 1.0, 1.25, 1.75, 2.0, 2.5, -0.75])
    expect = [1.0, 0.8671875, 0.2265625, 0.0, -0.0703125, -0.0234375, 0.0, 0.0, 0.2265625]
    np.testing.assert_array_equal(cubic_kernel(x), expect)


def test_down2_taps_interior_and_border():
    w, idx = resize_weights(16, 8, 0.5)
    assert w.shape == (8, 8)  # ceil(4/0.5) + 2 = 10 candidate taps, the two zero ones are dropped
    # output 4 (1-based) sits at u = 7.5: taps are input pixels 4..11 (1-based) = 3..10 (0-based)
    np.testing.assert_allclose(w[3], DOWN2, rtol=0, atol=1e-15)
    np.testing.assert_array_equal(idx[3], np.arange(3, 11))
    # output 1 sits at u = 1.5: taps -2..5 mirror to 3,2,1,1,2,3,4,5 (1-based)
    np.testing.assert_array_equal(idx[0], [2, 1, 0, 0, 1, 2, 3, 4])
    np.testing.assert_array_equal(idx[7], [11, 12, 13, 14, 15, 15, 14, 13])


def test_up2_taps():
    w, idx = resize_weights(8, 16, 2.0)
    # output 1 at u = 0.75: taps 0,1,2,3 (1-based) at distances 1.75, 0.75, 0.25, 1.25; pixel 0 mirrors to 1
    np.testing.assert_allclose(w[0], [-0.0234375, 0.2265625, 0.8671875, -0.0703125], rtol=0, atol=1e-15)
    np.testing.assert_array_equal(idx[0], [1, 0, 0, 1])


def test_down4_taps():
    w, idx = resize_weights(64, 16, 0.25)
    assert w.shape[1] == 16  # support 16 px, 18 candidates, two zero-weight columns dropped
    row = w[5]
    np.testing.assert_allclose(row.sum(), 1.0, atol=1e-15)
    np.testing.assert_allclose(row, row[::-1], atol=1e-15)  # u = 4i - 1.5 is centred between two pixels
    # weights ∝ k(d/4): k(0.125) = 0.9638671875, k(0.375) = 0.7275390625 (by hand)
    np.testing.assert_allclose(row[7] / row[6], 0.9638671875 / 0.7275390625, rtol=1e-14)
    # output 6 (1-based) sits at u = 22.5: taps 15..30 (1-based) lie within the support |d| <= 8
    np.testing.assert_array_equal(idx[5], np.arange(14, 30))


def test_ramp_down2_values():
    x = np.arange(1, 17, dtype=np.float64)[:, None]  # a column: (H=16, W=1)
    y = imresize(x, (0.5, 1.0))[:, 0]
    assert y.shape == (8,)
    # interior: the symmetric kernel reproduces the ramp at u = 2i - 0.5
    np.testing.assert_allclose(y[2:6], 2 * np.arange(3, 7) - 0.5, rtol=0, atol=1e-12)
    # output 2 reaches pixel 0, which mirrors to pixel 1: 3.5 + DOWN2[0]·(1 - 0) = 3.48828125
    np.testing.assert_allclose(y[1], 3.48828125, rtol=0, atol=1e-13)
    # border: DOWN2 · [3, 2, 1, 1, 2, 3, 4, 5] = 1.44921875 (by hand); the far end mirrors it around 8.5
    np.testing.assert_allclose(y[0], 1.44921875, rtol=0, atol=1e-13)
    np.testing.assert_allclose(y[7], 17 - 1.44921875, rtol=0, atol=1e-13)


def test_ramp_up2_values():
    x = np.arange(1, 9, dtype=np.float64)[:, None]
    y = imresize(x, (2.0, 1.0))[:, 0]
    assert y.shape == (16,)
    # interpolation reproduces linear data at u = i/2 + 1/4
    np.testing.assert_allclose(y[3:13], np.arange(4, 14) / 2 + 0.25, rtol=0, atol=1e-12)
    # output 3 (u = 1.75) reaches pixel 0 (weight k(1.75) = -0.0234375), which mirrors to pixel 1
    np.testing.assert_allclose(y[2], 1.75 - 0.0234375, rtol=0, atol=1e-13)
    # -0.0234375·2 + 0.2265625·1 + 0.8671875·1 - 0.0703125·2 = 0.90625
    np.testing.assert_allclose(y[0], 0.90625, rtol=0, atol=1e-13)


def test_impulse_2d_is_separable():
    img = np.zeros((16, 16))
    img[7, 9] = 1.0
    out = imresize(img, 0.5)
    # the impulse at (8, 10) 1-based reaches output row 4 via tap 5 and output column 5 via tap 4 (0-based)
    expect = np.zeros((8, 8))
    w, idx = resize_weights(16, 8, 0.5)
    for i in range(8):
        for j in range(8):
            expect[i, j] = w[i][idx[i] == 7].sum() * w[j][idx[j] == 9].sum()
    np.testing.assert_allclose(out, expect, rtol=0, atol=1e-15)
    assert out[3, 4] == pytest.approx(DOWN2[4] * DOWN2[3], abs=1e-15)


@pytest.mark.parametrize("scale", [2, 3, 4])
@pytest.mark.parametrize("hw", [(48, 60), (37, 29)])
def test_matches_padded_torch_antialias(scale, hw):
    """An independent route: torch's antialiased bicubic (a = -0.5) on a symmetrically padded image."""
    g = torch.Generator().manual_seed(scale)
    h, w = hw
    h, w = h - h % scale, w - w % scale
    x = torch.rand(2, 3, h, w, generator=g, dtype=torch.float64)
    ours = bicubic_downsample(x, scale)
    pad = 3 * scale
    xp = torch.from_numpy(np.pad(x.numpy(), ((0, 0), (0, 0), (pad, pad), (pad, pad)), mode="symmetric"))
    ref = F.interpolate(xp, size=(xp.shape[-2] // scale, xp.shape[-1] // scale), mode="bicubic",
                        align_corners=False, antialias=True)[..., 3:-3, 3:-3]
    assert ours.shape == (2, 3, h // scale, w // scale)
    assert (ours - ref).abs().max().item() < 1e-13


def test_output_size_is_ceil():
    x = torch.rand(3, 37, 29)
    assert bicubic_downsample(x, 4).shape == (3, 10, 8)
    assert imresize(x, 0.5).shape == (3, 19, 15)
    assert imresize(x, output_size=(20, 10)).shape == (3, 20, 10)
    assert imresize(np.zeros((37, 29, 3)), 3).shape == (111, 87, 3)


def test_constant_image_stays_constant():
    x = torch.full((1, 3, 30, 42), 0.3, dtype=torch.float64)
    for s in (2, 3, 4):
        y = bicubic_downsample(x, s)
        assert (y - 0.3).abs().max().item() < 1e-15
    y = imresize(x, 3.0)
    assert (y - 0.3).abs().max().item() < 1e-15


def test_numpy_torch_and_batch_agree():
    rng = np.random.default_rng(0)
    hwc = rng.random((24, 36, 3))
    a = bicubic_downsample(hwc, 3)
    b = bicubic_downsample(torch.from_numpy(hwc).permute(2, 0, 1), 3).permute(1, 2, 0).numpy()
    batch = torch.from_numpy(np.stack([hwc, hwc[::-1].copy()])).permute(0, 3, 1, 2)
    c = bicubic_downsample(batch, 3)[0].permute(1, 2, 0).numpy()
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-15)
    np.testing.assert_allclose(a, c, rtol=0, atol=1e-15)
    assert a.dtype == np.float64


def test_float32_cpu_is_computed_in_float64():
    x = torch.rand(3, 40, 40)
    y = bicubic_downsample(x, 4)
    assert y.dtype == torch.float32
    assert torch.equal(y, bicubic_downsample(x.double(), 4).float())


def test_uint8_rounds_and_saturates():
    img = np.zeros((16, 16), dtype=np.uint8)
    img[6:10, 6:10] = 255
    out = imresize(img, 0.5)
    ref = imresize(img.astype(np.float64), 0.5)
    assert out.dtype == np.uint8
    assert ref.min() < 0 and ref.max() <= 255  # ringing undershoots...
    np.testing.assert_array_equal(out, np.clip(np.round(ref), 0, 255).astype(np.uint8))  # ...and is clipped
    t = imresize(torch.from_numpy(img), 0.5)
    assert t.dtype == torch.uint8 and np.array_equal(t.numpy(), out)


def test_scale_one_is_identity_and_errors():
    x = torch.rand(1, 3, 9, 11, dtype=torch.float64)
    assert (imresize(x, 1.0) - x).abs().max().item() < 1e-15
    with pytest.raises(ValueError):
        imresize(x)
    with pytest.raises(TypeError):
        imresize([[1.0]], 0.5)


def test_modcrop():
    assert modcrop(torch.zeros(3, 37, 29), 4).shape == (3, 36, 28)
    assert modcrop(np.zeros((37, 29, 3)), 3).shape == (36, 27, 3)
    assert modcrop(np.zeros((36, 27)), 3).shape == (36, 27)
