"""One optimizer step: the image loss, gradient accumulation over micro-batches, AdamW and its schedule."""
from __future__ import annotations

import contextlib
import math

import numpy as np
import torch
import torch.nn.functional as F

from tessera.config.train import TrainConfig
from tessera.models.chunked_loss import at_least_fp32


def image_loss(logits: torch.Tensor, codes: torch.Tensor, valid: torch.Tensor | None = None,
               denominator: torch.Tensor | float | None = None) -> torch.Tensor:
    """Cross-entropy over the image tokens; samples without a caption (valid False) do not count.

    `denominator` (the number of counted tokens of the whole batch) lets the micro-batches of one
    step add up to exactly the loss of the whole batch. The plain definition, from whole logits;
    training computes the same loss inside the model's forward, chunk by chunk (`token_weights`)."""
    per_token = F.cross_entropy(at_least_fp32(logits.flatten(0, 1)), codes.flatten(), reduction="none")
    if valid is None:
        return per_token.sum() / (denominator or per_token.numel())
    weight = valid[:, None].expand_as(codes).flatten().to(per_token.dtype)
    if denominator is None:
        denominator = weight.sum().clamp(min=1)
    return (per_token * weight).sum() / denominator


def token_weights(valid: torch.Tensor, n_tokens: int, denominator: float) -> torch.Tensor:
    """(B, n_tokens) weights of image_loss: 1 / denominator for samples with a caption, else 0."""
    return (valid.float() / denominator)[:, None].expand(-1, n_tokens)


def split(batch: dict, micro_batch: int) -> list[dict]:
    """A worker's share of the global batch, cut into micro-batches of `micro_batch` samples."""
    n = len(batch["codes"])
    if n % micro_batch:
        raise ValueError(f"a batch of {n} samples does not split into micro-batches of {micro_batch}")
    return [{k: v[i:i + micro_batch] for k, v in batch.items()} for i in range(0, n, micro_batch)]


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, micro_batches: list[dict], *,
               grad_clip: float = 1.0, device: torch.device | str = "cpu",
               autocast_dtype: torch.dtype | None = None) -> dict:
    """One optimizer step over the micro-batches (gradient accumulation).

    Returns the loss and grad norm as tensors on the device: nothing here waits for the device.
    The loss is the mean over the counted tokens of all micro-batches together."""
    model.train()
    device = torch.device(device)
    counted = sum(int(b["valid"].sum()) for b in micro_batches) * micro_batches[0]["codes"].shape[1]
    denominator = max(counted, 1)
    total = torch.zeros((), device=device)
    n = len(micro_batches)
    for i, batch in enumerate(micro_batches):
        codes = batch["codes"].to(device, non_blocking=True)
        inputs = batch["inputs"].to(device, non_blocking=True) if "inputs" in batch else codes
        cond = batch["cond"].to(device, non_blocking=True)
        cond_mask = batch["cond_mask"].to(device, non_blocking=True)
        valid = batch["valid"].to(device, non_blocking=True)
        last = i == n - 1
        # Gradients are reduced across workers on the last micro-batch only (DDP and FSDP2).
        sync = model.no_sync() if hasattr(model, "no_sync") and not last else contextlib.nullcontext()
        if hasattr(model, "set_requires_gradient_sync"):
            model.set_requires_gradient_sync(last)
        autocast = (torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype
                    else contextlib.nullcontext())
        with sync:
            with autocast:
                loss = model(inputs[:, :-1], cond, cond_mask, targets=codes,
                             target_weight=token_weights(valid, codes.shape[1], denominator))
            loss.backward()
        total += loss.detach()
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return {"loss": total, "grad_norm": grad_norm.detach()}


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW, LlamaGen's way: weight decay on parameters of 2 or more dims only; the fused kernel
    (CUDA and CPU), except for sharded (DTensor) parameters on CPU, which it does not take."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.optim.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    sharded = any(type(p).__name__ == "DTensor" or type(p.data).__name__ == "DTensor" for p in params)
    fused = device.type == "cuda" or not sharded
    return torch.optim.AdamW(groups, lr=peak_lr(cfg), betas=tuple(cfg.optim.betas), fused=fused or None)


def peak_lr(cfg: TrainConfig) -> float:
    return cfg.optim.lr_per_256 * cfg.global_batch / 256


def lr_at(cfg: TrainConfig, step: int) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warmup, then constant or cosine."""
    peak, o = peak_lr(cfg), cfg.optim
    if step < o.warmup_steps:
        return peak * (step + 1) / o.warmup_steps
    if o.schedule == "constant":
        return peak
    progress = min(1.0, (step - o.warmup_steps) / max(1, cfg.max_steps - o.warmup_steps))
    return peak * (o.min_lr_ratio + (1 - o.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def step_seed(seed: int, rank: int, step: int) -> int:
    """The seed of one worker's randomness (dropout, CFG drop) at one step.

    Different on every rank, and a pure function of (run seed, rank, step): a resumed run draws
    exactly what an uninterrupted one would, with no RNG state to save, on any number of workers."""
    return int(np.random.SeedSequence([seed, rank, step]).generate_state(1, np.uint64)[0] >> 1)


def seed_step(seed: int, rank: int, step: int) -> None:
    torch.manual_seed(step_seed(seed, rank, step))  # CPU and every CUDA device
