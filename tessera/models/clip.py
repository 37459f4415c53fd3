"""open_clip models by architecture name and checkpoint path, and the tiny CLIP for tests and the demo.

A checkpoint is a state-dict file (`.bin`/`.pt`/`.pth` or `.safetensors`) or a folder holding one
next to an `open_clip_config.json` (the layout open_clip models use on the hub). When the folder
names an architecture open_clip does not know, its config is registered under that name, so a
custom architecture (like the tiny one) loads through the same path as ViT-L-14.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass

import numpy as np
import torch

from tessera.models.weights import load_state_dict

CONFIG_FILE = "open_clip_config.json"
WEIGHT_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin", "model.safetensors", "model.pt")

TINY_ARCH = "tessera-tiny-clip"
TINY_CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "head_width": 32, "patch_size": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class ClipPreprocess:
    """What turns a decoded image into CLIP's input: resize the short side and centre crop (on the
    CPU, as uint8, a quarter of the bytes to move), then normalise (on the model's device)."""

    image_size: int
    mean: tuple[float, float, float] = OPENAI_MEAN
    std: tuple[float, float, float] = OPENAI_STD

    def __call__(self, img) -> np.ndarray:
        """(H, W, 3) uint8."""
        from PIL import Image

        # The same arithmetic as open_clip's eval transform (torchvision Resize + CenterCrop).
        w, h = img.size
        short, long = min(w, h), max(w, h)
        new_long = int(self.image_size * long / short)
        size = (self.image_size, new_long) if w <= h else (new_long, self.image_size)
        img = img.resize(size, Image.BICUBIC)
        left = int(round((size[0] - self.image_size) / 2.0))
        top = int(round((size[1] - self.image_size) / 2.0))
        return np.asarray(img.crop((left, top, left + self.image_size, top + self.image_size)), dtype=np.uint8)

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        """(N, H, W, 3) uint8 -> (N, 3, H, W) float, normalised."""
        mean = torch.tensor(self.mean, device=pixels.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=pixels.device).view(1, 3, 1, 1)
        return (pixels.permute(0, 3, 1, 2).float() / 255.0 - mean) / std


def _checkpoint_files(checkpoint: str) -> tuple[str, dict | None]:
    """The weights file of a checkpoint, and the folder's open_clip config when there is one."""
    if os.path.isdir(checkpoint):
        config = None
        if os.path.exists(os.path.join(checkpoint, CONFIG_FILE)):
            with open(os.path.join(checkpoint, CONFIG_FILE)) as f:
                config = json.load(f)
        for name in WEIGHT_FILES:
            if os.path.exists(os.path.join(checkpoint, name)):
                return os.path.join(checkpoint, name), config
        raise FileNotFoundError(f"{checkpoint}: no CLIP weights in it (looked for {', '.join(WEIGHT_FILES)})")
    if not os.path.exists(checkpoint):
        raise FileNotFoundError(f"CLIP checkpoint {checkpoint} does not exist")
    return checkpoint, None


def _register(arch: str, config: dict | None) -> None:
    import open_clip
    from open_clip import factory

    if open_clip.get_model_config(arch) is not None:
        return
    if config is None or "model_cfg" not in config:
        raise ValueError(f"open_clip does not know the architecture {arch!r} and the checkpoint "
                         f"has no {CONFIG_FILE} describing it")
    factory._MODEL_CONFIGS[arch] = config["model_cfg"]


def preprocess_for(arch: str, checkpoint: str) -> ClipPreprocess:
    """CLIP's input transform for an architecture, without loading any weights."""
    import open_clip

    _, config = _checkpoint_files(checkpoint)
    _register(arch, config)
    image_size = open_clip.get_model_config(arch)["vision_cfg"]["image_size"]
    pre = (config or {}).get("preprocess_cfg", {})
    return ClipPreprocess(int(image_size if isinstance(image_size, int) else image_size[0]),
                          tuple(pre.get("mean", OPENAI_MEAN)), tuple(pre.get("std", OPENAI_STD)))


# Words open_clip's BPE tokenizer may keep in its cache. It caches every word it has seen, without
# bound, and a scorer lives across shards: one long caption of made-up words adds a word per word.
TOKENIZER_CACHE_WORDS = 50_000


def bound_tokenizer_cache(tokenizer, limit: int = TOKENIZER_CACHE_WORDS) -> None:
    """Empty a BPE tokenizer's word cache (keeping its special tokens) once it holds over `limit`."""
    cache = getattr(tokenizer, "cache", None)
    if isinstance(cache, dict) and len(cache) > limit:
        special = [tokenizer.decoder[i] for i in getattr(tokenizer, "all_special_ids", [])]
        tokenizer.cache = {t: t for t in special}


class Clip:
    """An open_clip model that embeds images and texts, L2-normalised."""

    def __init__(self, arch: str, checkpoint: str, device: str = "cpu", force_quick_gelu: bool = False,
                 precision: str = "fp32"):
        import open_clip

        weights, config = _checkpoint_files(checkpoint)
        _register(arch, config)
        logging.disable(logging.WARNING)  # open_clip warns "initialized randomly"; weights load next
        try:
            self.model = open_clip.create_model(arch, pretrained=None, force_quick_gelu=force_quick_gelu)
        finally:
            logging.disable(logging.NOTSET)
        state = load_state_dict(weights)
        if any(k.startswith("module.") for k in state):
            state = {k.removeprefix("module."): v for k, v in state.items()}
        self.model.load_state_dict(state, strict=True)
        self.model.to(device).eval()
        self.device = device
        self.autocast = precision == "bf16" and device.startswith("cuda")
        self.tokenizer = open_clip.get_tokenizer(arch)
        self.tokenizer_cache_words = TOKENIZER_CACHE_WORDS
        self.preprocess = preprocess_for(arch, checkpoint)
        self.embed_dim = int(open_clip.get_model_config(arch)["embed_dim"])

    @torch.inference_mode()
    def encode_images(self, pixels: np.ndarray) -> np.ndarray:
        x = self.preprocess.normalize(torch.from_numpy(pixels).to(self.device))
        with torch.autocast("cuda", torch.bfloat16, enabled=self.autocast):
            emb = self.model.encode_image(x)
        return torch.nn.functional.normalize(emb.float(), dim=-1).cpu().numpy()

    @torch.inference_mode()
    def encode_texts(self, texts: list[str]) -> np.ndarray:
        tokens = self.tokenizer(texts).to(self.device)
        bound_tokenizer_cache(self.tokenizer, self.tokenizer_cache_words)
        with torch.autocast("cuda", torch.bfloat16, enabled=self.autocast):
            emb = self.model.encode_text(tokens)
        return torch.nn.functional.normalize(emb.float(), dim=-1).cpu().numpy()


def build_tiny(path: str, seed: int = 0) -> None:
    """A tiny open_clip CLIP saved the way open_clip checkpoints are laid out on the hub."""
    import open_clip
    from open_clip import factory

    factory._MODEL_CONFIGS.setdefault(TINY_ARCH, TINY_CONFIG)
    torch.manual_seed(seed)
    logging.disable(logging.WARNING)
    try:
        model = open_clip.create_model(TINY_ARCH, pretrained=None)
    finally:
        logging.disable(logging.NOTSET)
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, CONFIG_FILE), "w") as f:
        json.dump({"model_cfg": TINY_CONFIG,
                   "preprocess_cfg": {"mean": list(OPENAI_MEAN), "std": list(OPENAI_STD)}}, f, indent=2)
    torch.save(model.state_dict(), os.path.join(path, "open_clip_pytorch_model.bin"))
