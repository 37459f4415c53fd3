"""Tokenizer metrics as LlamaGen reports them: SSIM with its window, covariance and constants
(checked against a direct per-window computation of the definition), PSNR on [0, 1], batched
reconstruction equal to one pass, and the codebook usage an image count allows."""
import numpy as np
import pytest

from tessera.eval.tokenizer_eval import psnr, reconstruct, ssim, usage_cap
from tessera.models.vq import build_tiny, load_vq


def _ssim_by_windows(a: np.ndarray, b: np.ndarray) -> float:
    """SSIM of one (H, W, 3) pair, window by window: 7x7 uniform windows that fit in the image,
    sample (n - 1) variances, C1 = (0.01 L)^2 and C2 = (0.03 L)^2 with L = 2, channel mean."""
    x, y = a.astype(np.float64) / 255, b.astype(np.float64) / 255
    c1, c2 = (0.01 * 2) ** 2, (0.03 * 2) ** 2
    per_channel = []
    for ch in range(3):
        values = []
        for i in range(x.shape[0] - 6):
            for j in range(x.shape[1] - 6):
                p, q = x[i:i + 7, j:j + 7, ch].ravel(), y[i:i + 7, j:j + 7, ch].ravel()
                cov = np.cov(p, q)  # sample covariance
                values.append(((2 * p.mean() * q.mean() + c1) * (2 * cov[0, 1] + c2))
                              / ((p.mean() ** 2 + q.mean() ** 2 + c1) * (cov[0, 0] + cov[1, 1] + c2)))
        per_channel.append(np.mean(values))
    return float(np.mean(per_channel))


def test_ssim_follows_the_definition_with_llamagens_settings():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (2, 14, 17, 3), dtype=np.uint8)
    b = np.clip(a.astype(int) + rng.integers(-40, 41, a.shape), 0, 255).astype(np.uint8)
    got = ssim(a, b)
    for k in range(2):
        assert got[k] == pytest.approx(_ssim_by_windows(a[k], b[k]), abs=1e-12)
    assert ssim(a, a) == pytest.approx([1.0, 1.0])


def test_psnr_on_the_unit_scale():
    a = np.zeros((1, 8, 8, 3), np.uint8)
    b = np.full_like(a, 10)
    assert psnr(a, b)[0] == pytest.approx(10 * np.log10(1 / (10 / 255) ** 2))
    assert np.isinf(psnr(a, a)[0])


def test_batched_reconstruction_equals_one_pass(tmp_path):
    build_tiny(str(tmp_path / "vq"))
    vq = load_vq(str(tmp_path / "vq"))
    images = np.random.default_rng(1).integers(0, 256, (5, 64, 64, 3), dtype=np.uint8)
    whole, codes = reconstruct(vq, images, batch_size=5)
    batched, batched_codes = reconstruct(vq, images, batch_size=2)
    np.testing.assert_array_equal(codes, batched_codes)
    assert np.abs(whole.astype(int) - batched.astype(int)).max() <= 1  # float rounding across batch shapes


def test_usage_cap_says_what_an_image_count_allows():
    assert usage_cap(64 * 256, 16384) == 1.0 and usage_cap(16 * 256, 16384) == 0.25
