"""Tokenizer evaluation: reconstruct held-out images through the VQ (encode, decode) and measure.

PSNR and SSIM are torchmetrics' (per image, data range 1); codebook usage is the fraction of the
codebook's entries used at least once; rFID is the Fréchet distance between the features of the
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


def reconstruct(vq, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(N, R, R, 3) uint8 -> the VQ's reconstructions, same shape and dtype, and the codes (N, R/16, R/16)."""
    x = (to_unit(pixels) * 2 - 1).to(vq.device)
    with torch.no_grad():
        codes = vq.encode(x)
        y = vq.decode(codes).float()
    recon = ((y.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return recon, codes.cpu().numpy()


def psnr_ssim(original: np.ndarray, recon: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-image PSNR (dB) and SSIM of uint8 images (N, H, W, 3), by torchmetrics."""
    from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

    a, b = to_unit(recon), to_unit(original)
    psnr = peak_signal_noise_ratio(a, b, data_range=1.0, reduction="none", dim=(1, 2, 3))
    ssim = structural_similarity_index_measure(a, b, data_range=1.0, reduction="none")
    return psnr.numpy().astype(np.float64), ssim.numpy().astype(np.float64)


def code_counts(codes: np.ndarray, codebook_size: int) -> np.ndarray:
    return np.bincount(codes.ravel().astype(np.int64), minlength=codebook_size)


def codebook_usage(counts: np.ndarray) -> float:
    return float((counts > 0).mean())
