"""The sample stage: a PNG grid of prompts from any checkpoint (LlamaGen's too); the generation
itself is tessera/models/generation.py.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from tessera.config import RunConfig
from tessera.config.train import SampleConfig
from tessera.core.funnel import StageResult
from tessera.core.store import ShardStore
from tessera.models.generation import render, save_grid
from tessera.models.gpt import GPT, GPTConfig, extract_state_dict, gpt_config
from tessera.models.identity import model_config_of, resolution_of
from tessera.models.refs import resolve
from tessera.models.text_encoder import TextEncoder
from tessera.models.vq import load_vq
from tessera.training.checkpoint import (
    latest_checkpoint,
    read_checkpoint_any,
    stage_dir,
)

log = logging.getLogger(__name__)


# Loading a generator from any checkpoint ----------------------------------------------------------
def load_generator(path: str, fallback: GPTConfig, resolution: int | None,
                   device: str = "cpu") -> tuple[GPT, int]:
    """The model of a checkpoint (ours carry their config; LlamaGen's take `fallback`) and its
    resolution: `resolution` when given, else the checkpoint's own (a key, or a released file's
    known name), else 256."""
    ckpt = read_checkpoint_any(path)
    model_config = model_config_of(ckpt)
    cfg = GPTConfig(**model_config) if model_config is not None else fallback
    resolution = resolution or resolution_of(ckpt, path) or 256
    with torch.device(device):
        model = GPT(cfg, grid=resolution // 16)
    model.load_state_dict(extract_state_dict(ckpt), strict=True)
    return model.eval(), resolution


@dataclass
class SampleResult(StageResult):
    checkpoint: str
    grid: str
    images: int
    tokens_per_s: float

    def outcomes(self) -> list[tuple[str, str, str, int]]:
        return [("sample", "generated", "", self.images)]


def find_checkpoint(cfg: RunConfig, run: str) -> str:
    for stage in ("stage2", "stage1"):
        url = latest_checkpoint(ShardStore(stage_dir(cfg.runs_root, run, stage)))
        if url:
            return url
    raise FileNotFoundError(f"run {run!r} under {cfg.runs_root} has no checkpoint yet; "
                            "train it first (make stage1) or set sample.checkpoint")


def run(cfg: RunConfig, run_name: str | None = None, checkpoint: str | None = None,
        prompts: list[str] | None = None) -> SampleResult:
    """Sample the prompts from a checkpoint and write a PNG grid under {run}/samples/."""

    scfg: SampleConfig = cfg.sample or SampleConfig()
    run_name = run_name or cfg.name
    explicit = checkpoint or scfg.checkpoint
    path = resolve(explicit, cfg.models_root) if explicit else find_checkpoint(cfg, run_name)
    torch.manual_seed(scfg.seed)
    model, resolution = load_generator(path, gpt_config(scfg.model, text_rope=scfg.text_rope),
                                       scfg.resolution, scfg.device)
    if scfg.device.startswith("cuda"):
        model = model.to(torch.bfloat16)
        model.set_grid(model.grid)  # the RoPE table stays in fp32
    log.info("Sampling %s (%s, %dpx) on %s.", path, type(model).__name__, resolution, scfg.device)
    text_encoder = TextEncoder.from_pretrained(resolve(scfg.text_encoder, cfg.models_root),
                                               max_length=model.cfg.cls_token_num, device=scfg.device,
                                               clean=scfg.caption_clean)
    vq = load_vq(resolve(scfg.vq, cfg.models_root), device=scfg.device)
    prompts = [p for p in (prompts or scfg.prompts) for _ in range(scfg.images_per_prompt)]
    generator = torch.Generator(scfg.device).manual_seed(scfg.seed)
    images, tps = render(model, vq, text_encoder, prompts, batch_size=scfg.batch_size, generator=generator,
                         cfg_scale=scfg.cfg_scale, temperature=scfg.temperature, top_k=scfg.top_k,
                         top_p=scfg.top_p, use_cache=scfg.use_cache)
    out = ShardStore(stage_dir(cfg.runs_root, run_name, "samples"))
    name = f"{time.strftime('%Y%m%d-%H%M%S')}-{path.rstrip('/').rsplit('/', 1)[-1].removesuffix('.pt')}.png"
    with out.open_atomic(name) as f:
        save_grid(images, f, nrow=scfg.images_per_prompt if scfg.images_per_prompt > 1 else None, labels=prompts)
    log.info("Wrote %d images to %s (%.1f tokens/s).", len(images), out.url(name), tps)
    return SampleResult(checkpoint=path, grid=out.url(name), images=len(images), tokens_per_s=tps)
