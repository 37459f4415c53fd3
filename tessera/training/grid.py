"""The sample grid drawn during training, shared by every worker.

Each worker draws its own share of the prompts (worker r the r-th slice of ceil(n / world)
prompts) with the same weights, so drawing takes the time of one share and no worker stands
idle while another draws. The images then meet on worker 0 (one gather of a few small tensors),
which writes the PNG and the TensorBoard image. A worker whose drawing fails hands in nothing
and says why; the grid is then written without its share, and training goes on.
"""
from __future__ import annotations

import io
import logging
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist

from tessera.core.store import ShardStore
from tessera.models.generation import render, save_grid
from tessera.models.gpt import GPT
from tessera.training.metrics import MetricsLog

log = logging.getLogger(__name__)


def share_of(prompts: list[str], rank: int, world: int) -> tuple[int, list[str]]:
    """The index of this worker's first prompt, and its prompts."""
    per = -(-len(prompts) // world)
    return rank * per, prompts[rank * per:(rank + 1) * per]


def draw_share(model: GPT, vq, text_encoder, prompts: list[str], seed: int, rank: int, world: int) -> torch.Tensor | None:
    """This worker's images (k, 3, H, W) in [-1, 1] on the CPU, or None when it drew none or failed."""
    first, mine = share_of(prompts, rank, world)
    if not mine or vq is None:  # no VQ model: it could not be loaded (and was reported) on this worker
        return None
    try:
        device = next(model.parameters()).device
        generator = torch.Generator(device).manual_seed(int(np.random.SeedSequence([seed, first]).generate_state(1)[0]))
        images, _ = render(model, vq, text_encoder, mine, generator=generator,
                           cfg_scale=4.0, temperature=1.0, top_k=1000, top_p=1.0)
        return images.cpu()
    except Exception as e:  # noqa: BLE001 - a grid is never worth a training run
        log.warning("Worker %d could not draw its part of the sample grid: %s", rank, e)
        return None
    finally:
        model.train()


def gather_images(images: torch.Tensor | None, rank: int, world: int) -> list[torch.Tensor | None]:
    """Every worker's images, in rank order, on worker 0 (an empty list on the others)."""
    if world == 1:
        return [images]
    parts: list = [None] * world
    dist.all_gather_object(parts, images)
    return parts if rank == 0 else []


def sample_grid(model: GPT, vq, text_encoder, prompts: list[str], seed: int, rank: int, world: int,
                write: Callable[[bytes], None]) -> int:
    """Draw this worker's share, gather on worker 0, which hands the PNG to `write`; returns the
    number of images this worker drew. Every worker must call it (the gather is collective)."""
    images = draw_share(model, vq, text_encoder, prompts, seed, rank, world)
    parts = gather_images(images, rank, world)
    if rank == 0:
        drawn = [(i, p) for i, p in enumerate(parts) if p is not None]
        if drawn:
            labels = [text for i, _ in drawn for text in share_of(prompts, i, world)[1]]
            buf = io.BytesIO()
            save_grid(torch.cat([p for _, p in drawn]), buf, labels=labels)
            write(buf.getvalue())
    return 0 if images is None else len(images)


def grid_writer(run: ShardStore, metrics: MetricsLog, step: int) -> Callable[[bytes], None]:
    """Where worker 0 puts a grid: samples/step-NNNNNNNN.png and the metrics' image."""
    def write(png: bytes) -> None:
        run.write_bytes(png, "samples", f"step-{step:08d}.png")
        metrics.image(step, png)
    return write
