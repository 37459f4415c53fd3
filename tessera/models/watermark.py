"""The LAION-5B watermark detector: timm efficientnet_b3a with LAION's classifier head.

Input: the image resized to 256x256 (aspect not kept), ImageNet mean and std.
pwatermark = softmax(logits)[:, 0]. The released files come in two layouts, a raw state dict or
one nested under `weights`; both load.
"""
from __future__ import annotations

import os

import numpy as np
import torch
from torch import nn

from tessera.models.weights import load_state_dict

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)
TINY_ARCH = "test_efficientnet"


def build_detector(arch: str = "efficientnet_b3a") -> nn.Module:
    import timm

    model = timm.create_model(arch, pretrained=False)
    model.classifier = nn.Sequential(
        nn.Linear(model.num_features, 625),
        nn.ReLU(),
        nn.Dropout(p=0.3),
        nn.Linear(625, 256),
        nn.ReLU(),
        nn.Linear(256, 2),
    )
    return model


def load_watermark(path: str, arch: str = "efficientnet_b3a") -> nn.Module:
    model = build_detector(arch)
    model.load_state_dict(load_state_dict(path, key="weights"), strict=True)
    return model.eval()


def preprocess(img, image_size: int = 256) -> np.ndarray:
    """(H, W, 3) uint8: the image squashed to a square; normalised on the model's device."""
    from PIL import Image

    return np.asarray(img.resize((image_size, image_size), Image.BICUBIC), dtype=np.uint8)


@torch.inference_mode()
def pwatermark(model: nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    """pwatermark of (N, H, W, 3) uint8 images."""
    mean = torch.from_numpy(IMAGENET_MEAN).to(pixels.device).view(1, 3, 1, 1)
    std = torch.from_numpy(IMAGENET_STD).to(pixels.device).view(1, 3, 1, 1)
    x = (pixels.permute(0, 3, 1, 2).float() / 255.0 - mean) / std
    return torch.softmax(model(x).float(), dim=-1)[:, 0]


def build_tiny(path: str, seed: int = 3) -> None:
    """A tiny detector (timm's test EfficientNet), saved in the `weights`-nested layout."""
    torch.manual_seed(seed)
    os.makedirs(path, exist_ok=True)
    torch.save({"weights": build_detector(TINY_ARCH).state_dict()}, os.path.join(path, "watermark.pt"))
