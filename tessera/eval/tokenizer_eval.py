"""Tokenizer evaluation: reconstruct held-out images through the VQ (encode, decode) and measure.

PSNR and SSIM are computed as LlamaGen reports them (its reconstruction script uses
scikit-image): PSNR on [0, 1] images (data range 1); SSIM per channel with a 7x7 uniform window,
sample covariances, the constants of a data range of 2, averaged over the window positions that
fit in the image and over the channels. Codebook usage is the fraction of the codebook's entries
used at least once, over every code of every image (a set of N images at grid g shows at most
N g^2 distinct codes: `usage_cap` in the row says what the image count allows); rFID is the Fréchet distance between the features of the
originals and of the reconstructions (Inception-v3 when its weights are given, the configured
CLIP's image features otherwise; the result says which). Every figure merges over shards: sums
of per-image values, code counts, feature moments.
"""
from __future__ import annotations

import numpy as np
import torch


def to_unit(pixels: np.ndarray) -> torch.Tensor:
    """(N, H, W, 3) uint8 -> (N, 3, H, W) float in [0, 1]."""
    return torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255.0


SSIM_WINDOW = 7
SSIM_DATA_RANGE = 2.0  # LlamaGen passes 2 for [0, 1] images; the constants follow from it


def reconstruct(vq, pixels: np.ndarray, batch_size: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """(N, R, R, 3) uint8 -> the VQ's reconstructions, same shape and dtype, and the codes (N, R/16, R/16),
    `batch_size` images at a time (memory is bounded whatever N)."""
    recons, all_codes = [], []
    for i in range(0, len(pixels), batch_size):
        x = (to_unit(pixels[i:i + batch_size]) * 2 - 1).to(vq.device)
        with torch.no_grad():
            codes = vq.encode(x)
            y = vq.decode(codes).float()
        recons.append(((y.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy())
        all_codes.append(codes.cpu().numpy())
    return np.concatenate(recons), np.concatenate(all_codes)


def psnr(original: np.ndarray, recon: np.ndarray) -> np.ndarray:
    """Per-image PSNR (dB) of uint8 images (N, H, W, 3) on the [0, 1] scale."""
    a = original.astype(np.float64) / 255.0
    b = recon.astype(np.float64) / 255.0
    mse = ((a - b) ** 2).reshape(len(a), -1).mean(1)
    with np.errstate(divide="ignore"):
        return 10.0 * np.log10(1.0 / mse)


def ssim(original: np.ndarray, recon: np.ndarray) -> np.ndarray:
    """Per-image SSIM of uint8 images (N, H, W, 3) on the [0, 1] scale, LlamaGen's settings."""
    x = torch.from_numpy(original).permute(0, 3, 1, 2).double() / 255.0
    y = torch.from_numpy(recon).permute(0, 3, 1, 2).double() / 255.0
    n = SSIM_WINDOW * SSIM_WINDOW
    cov_norm = n / (n - 1)

    def mean(t: torch.Tensor) -> torch.Tensor:  # over each window that fits in the image
        return torch.nn.functional.avg_pool2d(t, SSIM_WINDOW, stride=1)

    ux, uy = mean(x), mean(y)
    vx = cov_norm * (mean(x * x) - ux * ux)
    vy = cov_norm * (mean(y * y) - uy * uy)
    vxy = cov_norm * (mean(x * y) - ux * uy)
    c1, c2 = (0.01 * SSIM_DATA_RANGE) ** 2, (0.03 * SSIM_DATA_RANGE) ** 2
    s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux * ux + uy * uy + c1) * (vx + vy + c2))
    return s.mean(dim=(2, 3)).mean(1).numpy()


def psnr_ssim(original: np.ndarray, recon: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-image PSNR (dB) and SSIM of uint8 images (N, H, W, 3), as LlamaGen reports them."""
    return psnr(original, recon), ssim(original, recon)


def code_counts(codes: np.ndarray, codebook_size: int) -> np.ndarray:
    return np.bincount(codes.ravel().astype(np.int64), minlength=codebook_size)


def codebook_usage(counts: np.ndarray) -> float:
    return float((counts > 0).mean())


def usage_cap(codes_counted: int, codebook_size: int) -> float:
    """The highest codebook usage `codes_counted` codes can show."""
    return min(1.0, codes_counted / codebook_size)
