"""CLIP score with the configured open_clip model: max(100 * cos(image, caption), 0) per image.

This is torchmetrics' CLIPScore formula; torchmetrics loads only Hugging Face CLIP models, while
Tessera's CLIP is an open_clip model by path (ViT-L/14 at scale, the tiny one in the demo), so the
formula is applied here to open_clip's embeddings (`Clip.encode_images` / `encode_texts`).
"""
from __future__ import annotations

import numpy as np
from PIL import Image

from tessera.models.clip import Clip


def clip_inputs(clip: Clip, pixels: np.ndarray) -> np.ndarray:
    """(N, H, W, 3) uint8 -> CLIP's resized and centre-cropped (N, S, S, 3) uint8."""
    return np.stack([clip.preprocess(Image.fromarray(p)) for p in pixels])


def clip_cosines(clip: Clip, pixels: np.ndarray, prompts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Per-image cosine between image and caption embeddings (N,), and the L2-normalised image embeddings (N, D)."""
    if len(pixels) != len(prompts):
        raise ValueError(f"{len(pixels)} images but {len(prompts)} prompts")
    images = clip.encode_images(clip_inputs(clip, pixels))
    texts = clip.encode_texts(list(prompts))
    return (images * texts).sum(-1), images


def clip_score(clip: Clip, pixels: np.ndarray, prompts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Per-image CLIP scores max(100 cos, 0) (N,) and the L2-normalised image embeddings (N, D)."""
    cosines, images = clip_cosines(clip, pixels, prompts)
    return np.maximum(100.0 * cosines, 0.0), images
