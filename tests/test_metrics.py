"""PSNR/SSIM-Y with the SR-paper protocol: hand-worked values, and the bicubic reference numbers on real images."""
import hashlib
import importlib.util
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from rfsr_cuda.imresize import bicubic_downsample, imresize, modcrop
from rfsr_cuda.metrics import (calculate_psnr, calculate_ssim, evaluate_image, gaussian_window, rgb_to_y,
                               to_uint8_image)

C1 = (0.01 * 255) ** 2
C2 = (0.03 * 255) ** 2


def test_rgb_to_y_studio_swing():
    rgb = np.array([[0, 0, 0], [1, 1, 1], [1, 0, 0], [0, 1, 0], [0, 0, 1], [0.5, 0.25, 1.0]], dtype=np.float64)
    y = rgb_to_y(rgb)
    np.testing.assert_allclose(y, [16.0, 235.0, 81.481, 144.553, 40.966,
                                   16 + 0.5 * 65.481 + 0.25 * 128.553 + 24.966], rtol=0, atol=1e-12)
    t = rgb_to_y(torch.tensor(rgb, dtype=torch.float64).T.reshape(1, 3, 2, 3))
    assert t.shape == (1, 1, 2, 3)
    np.testing.assert_allclose(t.flatten().numpy(), y, rtol=0, atol=1e-12)


def test_to_uint8_rounding_and_clamping():
    x = torch.tensor([[[-0.2, 0.3 / 255, 0.7 / 255, 100.4 / 255, 100.6 / 255, 1.3]]])
    np.testing.assert_array_equal(to_uint8_image(x)[0, :, 0], [0, 0, 1, 100, 101, 255])
    assert to_uint8_image(np.full((2, 2), 7, np.uint8)).shape == (2, 2, 1)
    with pytest.raises(ValueError):
        to_uint8_image(torch.zeros(2, 3, 4, 4))  # a batch of two is not one image


def test_psnr_hand_values():
    a = np.zeros((20, 20, 1), np.uint8)
    b = a.copy()
    b[10, 10] = 10  # MSE = 100 / 400 = 0.25
    assert calculate_psnr(a, b, crop_border=0) == pytest.approx(10 * math.log10(255 ** 2 / 0.25), abs=1e-12)
    # with crop 2 the image is 16x16: MSE = 100 / 256
    assert calculate_psnr(a, b, crop_border=2) == pytest.approx(10 * math.log10(255 ** 2 * 256 / 100), abs=1e-12)
    b2 = a.copy()
    b2[1, 15] = 200  # only inside the cropped border
    assert calculate_psnr(a, b2, crop_border=2) == math.inf
    assert calculate_psnr(a, b2, crop_border=1) < 40


def test_psnr_on_y_vs_rgb():
    red = np.zeros((8, 8, 3), np.uint8)
    red[..., 0] = 255
    black = np.zeros((8, 8, 3), np.uint8)
    # Y differs by 65.481 everywhere; on RGB, MSE = 255² / 3
    assert calculate_psnr(red, black, 0) == pytest.approx(20 * math.log10(255 / 65.481), abs=1e-12)
    assert calculate_psnr(red, black, 0, test_y_channel=False) == pytest.approx(10 * math.log10(3), abs=1e-12)


def test_psnr_uses_rounded_images():
    hr = torch.full((3, 16, 16), 100 / 255)
    sr = hr + 0.4 / 255  # rounds back to 100
    assert calculate_psnr(sr, hr, 0) == math.inf
    sr = hr + 0.6 / 255  # rounds to 101: ΔY = (65.481 + 128.553 + 24.966) / 255 = 219/255
    assert calculate_psnr(sr, hr, 0) == pytest.approx(20 * math.log10(255 / (219 / 255)), abs=1e-9)


def test_ssim_constant_images():
    # σ = 0 inside every window: SSIM = (2ab + C1) / (a² + b² + C1)
    a = np.full((16, 16, 1), 100, np.uint8)
    b = np.full((16, 16, 1), 110, np.uint8)
    expect = (2 * 100 * 110 + C1) / (100 ** 2 + 110 ** 2 + C1)
    assert calculate_ssim(a, b, 0) == pytest.approx(expect, abs=1e-13)
    assert calculate_ssim(a, a, 0) == pytest.approx(1.0, abs=1e-15)


def test_gaussian_window():
    g = gaussian_window()
    assert g.shape == (11,) and g.sum() == pytest.approx(1.0, abs=1e-15)
    # ratio of neighbouring taps exp(-(1² - 0²) / (2·1.5²)) and the outermost exp(-25/4.5) relative to the centre
    assert g[6] / g[5] == pytest.approx(math.exp(-1 / 4.5), rel=1e-14)
    assert g[0] / g[5] == pytest.approx(math.exp(-25 / 4.5), rel=1e-14)


def test_ssim_single_window_by_hand():
    """On 11x11 images the 'valid' SSIM map has one value: the weighted statistics over the whole image."""
    rng = np.random.default_rng(3)
    x = rng.integers(0, 256, (11, 11, 1)).astype(np.uint8)
    y = np.clip(x.astype(int) + rng.integers(-30, 31, (11, 11, 1)), 0, 255).astype(np.uint8)
    w = np.outer(gaussian_window(), gaussian_window())
    xf, yf = x[..., 0].astype(np.float64), y[..., 0].astype(np.float64)
    mx, my = (w * xf).sum(), (w * yf).sum()
    vx, vy, cxy = (w * xf * xf).sum() - mx * mx, (w * yf * yf).sum() - my * my, (w * xf * yf).sum() - mx * my
    expect = (2 * mx * my + C1) * (2 * cxy + C2) / ((mx * mx + my * my + C1) * (vx + vy + C2))
    assert calculate_ssim(x, y, 0) == pytest.approx(expect, abs=1e-13)
    assert expect < 0.99
    with pytest.raises(ValueError):
        calculate_ssim(x, y, 1)  # 9x9 after the crop: no 11x11 window fits


def test_ssim_rgb_is_mean_of_channels():
    rng = np.random.default_rng(4)
    x = rng.integers(0, 256, (24, 20, 3)).astype(np.uint8)
    y = np.clip(x.astype(int) + rng.integers(-20, 21, x.shape), 0, 255).astype(np.uint8)
    per = [calculate_ssim(x[..., c], y[..., c], 2, test_y_channel=False) for c in range(3)]
    assert calculate_ssim(x, y, 2, test_y_channel=False) == pytest.approx(np.mean(per), abs=1e-15)
    assert calculate_ssim(x, y, 2) != pytest.approx(np.mean(per), abs=1e-6)  # Y differs from the RGB mean


def test_torch_and_numpy_inputs_agree():
    g = torch.Generator().manual_seed(0)
    sr = torch.rand(1, 3, 32, 40, generator=g)
    hr = (sr + 0.05 * torch.randn(sr.shape, generator=g)).clamp(0, 1)
    sr_np = sr[0].permute(1, 2, 0).numpy()
    hr_u8 = to_uint8_image(hr)
    assert calculate_psnr(sr, hr, 4) == calculate_psnr(sr_np, hr_u8, 4)
    assert calculate_ssim(sr, hr, 4) == calculate_ssim(sr_np, hr_u8, 4)


def test_evaluate_image_crops_non_modcropped_hr():
    g = torch.Generator().manual_seed(1)
    hr = torch.rand(3, 38, 41, generator=g)
    sr = hr[:, :36, :40] * 0.9
    res = evaluate_image(sr, hr, 4)
    assert res["psnr"] == calculate_psnr(sr, hr[:, :36, :40], 4)
    assert res["ssim"] == calculate_ssim(sr, hr[:, :36, :40], 4)
    with pytest.raises(ValueError):
        evaluate_image(sr, hr[:, :30, :40], 4)


# --- reference numbers (docs: bicubic ×s, MATLAB-equivalent LR saved as 8-bit, PSNR-Y/SSIM-Y, crop = s) ----------
# Images that ship inside scikit-image 0.26 and sporco 0.2.2 wheels; skipped when the package is not installed.
GOLDEN = {
    ("skimage", "data/astronaut.png", "88431cd9653c"): {2: (31.71, 0.9458), 3: (28.68, 0.8936), 4: (26.84, 0.8429)},
    ("skimage", "data/chelsea.png", "596aa1e7cb87"): {2: (35.26, 0.9160), 3: (32.89, 0.8542), 4: (31.48, 0.8064)},
    ("sporco", "data/monarch.png", "c2435a5e37c0"): {2: (32.95, 0.9609), 3: (29.43, 0.9206), 4: (27.46, 0.8816)},
    ("sporco", "data/barbara.png", "61ce3bead097"): {2: (27.96, 0.8392), 3: (26.21, 0.7505), 4: (25.12, 0.6836)},
}


def _bundled_image(package: str, rel: str, sha_prefix: str) -> np.ndarray:
    spec = importlib.util.find_spec(package)  # locates the package without importing it
    if spec is None or not spec.submodule_search_locations:
        pytest.skip(f"{package} is not installed")
    path = Path(list(spec.submodule_search_locations)[0]) / rel
    if not path.is_file():
        pytest.skip(f"{package} has no {rel}")
    data = path.read_bytes()
    if hashlib.sha256(data).hexdigest()[:12] != sha_prefix:
        pytest.skip(f"{package}'s {rel} is not the version the reference numbers were measured on")
    from PIL import Image
    import io
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


@pytest.mark.parametrize("key", list(GOLDEN), ids=lambda k: Path(k[1]).stem)
def test_bicubic_reference_numbers(key):
    hr_full = _bundled_image(*key)
    for scale, (psnr_ref, ssim_ref) in GOLDEN[key].items():
        hr = modcrop(hr_full, scale)
        lr = bicubic_downsample(hr.astype(np.float64) / 255.0, scale)
        lr = np.clip(np.round(lr * 255.0), 0, 255) / 255.0  # the LR image is stored as 8-bit
        sr = imresize(lr, float(scale))
        res = evaluate_image(sr, hr, scale)
        # the references are rounded to 2 (PSNR) and 4 (SSIM) decimals
        assert abs(res["psnr"] - psnr_ref) <= 0.005 + 1e-9, (scale, res)
        assert abs(res["ssim"] - ssim_ref) <= 0.00005 + 1e-9, (scale, res)


def test_agrees_with_scikit_image_metrics():
    """An independent implementation (when installed): skimage's PSNR and Gaussian SSIM on the same Y planes."""
    if importlib.util.find_spec("skimage") is None:
        pytest.skip("scikit-image is not installed")
    from skimage.color import rgb2ycbcr
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity
    rng = np.random.default_rng(5)
    hr = rng.integers(0, 256, (40, 52, 3)).astype(np.uint8)
    sr = np.clip(hr.astype(int) + rng.integers(-25, 26, hr.shape), 0, 255).astype(np.uint8)
    ya = rgb2ycbcr(hr)[3:-3, 3:-3, 0]
    yb = rgb2ycbcr(sr)[3:-3, 3:-3, 0]
    assert calculate_psnr(sr, hr, 3) == pytest.approx(peak_signal_noise_ratio(ya, yb, data_range=255), abs=1e-10)
    ref = structural_similarity(ya, yb, gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
                                data_range=255)
    assert calculate_ssim(sr, hr, 3) == pytest.approx(ref, abs=1e-10)
