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
    from PIL import Image

    x = np.asarray(img.resize((image_size, image_size), Image.BICUBIC), dtype=np.float32) / 255.0
    return ((x - IMAGENET_MEAN) / IMAGENET_STD).transpose(2, 0, 1).astype(np.float32)


@torch.inference_mode()
def pwatermark(model: nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    return torch.softmax(model(pixels).float(), dim=-1)[:, 0]


def build_tiny(path: str, seed: int = 3) -> None:
    """A tiny detector (timm's test EfficientNet), saved in the `weights`-nested layout."""
    torch.manual_seed(seed)
    os.makedirs(path, exist_ok=True)
    torch.save({"weights": build_detector(TINY_ARCH).state_dict()}, os.path.join(path, "watermark.pt"))
