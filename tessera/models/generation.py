"""Generation: image tokens from prompts with classifier-free guidance, decoded to pictures and grids.

CFG runs the batch twice, [conditional; unconditional], and mixes the logits u + s (c - u); the
chosen token feeds both halves. With the KV cache the text prefix is run once (prefill) and
every step feeds one token; without it every step reruns the whole sequence (the reference).
"""
from __future__ import annotations

import textwrap
import time
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from tessera.models.gpt import GPT, TEXT_POSITIONS


def left_pad(features: list[torch.Tensor], dim: int, length: int = TEXT_POSITIONS):
    """Stack (L_i, dim) features into (B, length, dim), real tokens at the right; and the mask."""
    out = torch.zeros(len(features), length, dim)
    mask = torch.zeros(len(features), length, dtype=torch.bool)
    for i, f in enumerate(features):
        f = f[:length]
        if len(f):
            out[i, length - len(f):] = f.float()
            mask[i, length - len(f):] = True
    return out, mask



def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Keep the top_k largest logits and the smallest set whose probability reaches top_p."""
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        drop = cumulative > top_p
        drop[..., 1:] = drop[..., :-1].clone()  # keep the token that crosses top_p
        drop[..., 0] = False
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits


def pick(logits: torch.Tensor, temperature: float, top_k: int, top_p: float,
         generator: torch.Generator | None) -> torch.Tensor:
    if temperature <= 0:
        return logits.argmax(-1)
    probs = F.softmax(filter_logits(logits / temperature, top_k, top_p), dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(model: GPT, cond: torch.Tensor, cond_mask: torch.Tensor | None = None, *,
             cfg_scale: float = 7.5, temperature: float = 1.0, top_k: int = 1000, top_p: float = 1.0,
             use_cache: bool = True, generator: torch.Generator | None = None,
             decode_step: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """Image codes (B, grid*grid) for caption features cond (B, cls_token_num, caption_dim).

    decode_step: `model.decode_step_static` or a compiled one (same shapes every step, the position
    in a tensor); by default the step attends over the filled prefix only."""
    model.eval()
    cond = cond.to(next(model.parameters()).dtype)
    b, n = cond.shape[0], model.num_image_tokens
    if cond_mask is None:
        cond_mask = torch.ones(cond.shape[:2], dtype=torch.bool, device=cond.device)
    guided = cfg_scale != 1.0
    drop = None
    if guided:
        cond, cond_mask = torch.cat([cond, cond]), torch.cat([cond_mask, cond_mask])
        drop = torch.arange(2 * b, device=cond.device) >= b

    def next_token(logits: torch.Tensor) -> torch.Tensor:
        if guided:
            c, u = logits[:b], logits[b:]
            logits = u + cfg_scale * (c - u)
        return pick(logits.float(), temperature, top_k, top_p, generator)

    tokens = torch.zeros(b, n, dtype=torch.long, device=cond.device)
    both = (lambda t: torch.cat([t, t])) if guided else (lambda t: t)
    if use_cache:
        model.setup_cache(cond.shape[0], dtype=next(model.parameters()).dtype)
        try:
            logits = model.prefill(cond, cond_mask, drop)
            for i in range(n):
                tokens[:, i] = next_token(logits)
                if i + 1 < n and decode_step is not None:
                    position = torch.full((1,), model.cfg.cls_token_num + i, device=cond.device)
                    logits = decode_step(both(tokens[:, i]), position)
                elif i + 1 < n:
                    logits = model.decode_step(both(tokens[:, i]), i)
        finally:
            model.clear_cache()
    else:
        for i in range(n):
            logits = model(both(tokens[:, :i]), cond, cond_mask, drop)[:, -1]
            tokens[:, i] = next_token(logits)
    return tokens


def encode_prompts(text_encoder, prompts: list[str], dim: int, device,
                   length: int = TEXT_POSITIONS) -> tuple[torch.Tensor, torch.Tensor]:
    cond, mask = left_pad([f.float().cpu() for f in text_encoder.encode(prompts)], dim, length)
    return cond.to(device), mask.to(device)


def save_grid(images: torch.Tensor, path_or_file, nrow: int | None = None, labels: list[str] | None = None) -> None:
    """Images in [-1, 1] (B, 3, H, W) as one PNG grid; with `labels`, each image's label under it."""
    from PIL import Image  # Pillow and torchvision are not needed to train or generate
    from torchvision.utils import make_grid

    nrow = nrow or max(1, int(len(images) ** 0.5 + 0.999))
    pixels = ((images.float().clamp(-1, 1) + 1) / 2).cpu()
    if labels is not None:
        cells = [labelled(img, text) for img, text in zip(pixels, labels)]
        tallest = max(c.shape[1] for c in cells)
        pixels = torch.stack([F.pad(c, (0, 0, 0, tallest - c.shape[1]), value=1.0) for c in cells])
    grid = make_grid(pixels, nrow=nrow, padding=2)
    Image.fromarray((grid.permute(1, 2, 0).numpy() * 255).round().astype("uint8")).save(path_or_file, format="PNG")


def labelled(image: torch.Tensor, text: str) -> torch.Tensor:
    """An image in [0, 1] (3, H, W) with `text` written on a white strip below it."""
    from PIL import Image, ImageDraw, ImageFont

    _, h, w = image.shape
    size = max(10, w // 20)
    font = ImageFont.load_default(size=size)
    lines = textwrap.wrap(text, width=max(8, int(w / (0.55 * size)))) or [""]
    strip = Image.new("RGB", (w, (size + 4) * len(lines) + 4), (255, 255, 255))
    draw = ImageDraw.Draw(strip)
    for i, line in enumerate(lines):
        draw.text((4, 2 + i * (size + 4)), line, fill=(0, 0, 0), font=font)
    below = torch.from_numpy(np.asarray(strip, dtype=np.float32) / 255.0).permute(2, 0, 1)
    return torch.cat([image, below], dim=1)


def render(model: GPT, vq, text_encoder, prompts: list[str], *, batch_size: int = 8,
           generator: torch.Generator | None = None, **sampling) -> tuple[torch.Tensor, float]:
    """Decoded images (N, 3, H, W) in [-1, 1] for the prompts, and the generation tokens/s."""
    device = next(model.parameters()).device
    images, tokens_done, seconds = [], 0, 0.0
    for i in range(0, len(prompts), batch_size):
        cond, mask = encode_prompts(text_encoder, prompts[i:i + batch_size], model.cfg.caption_dim, device,
                                    model.cfg.cls_token_num)
        start = time.perf_counter()
        codes = generate(model, cond, mask, generator=generator, **sampling)
        seconds += time.perf_counter() - start
        tokens_done += codes.numel()
        with torch.no_grad():
            images.append(vq.decode(codes.view(-1, model.grid, model.grid)).float().cpu())
    return torch.cat(images), tokens_done / max(seconds, 1e-9)
