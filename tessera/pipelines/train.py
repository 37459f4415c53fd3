"""Training the Llama generator from code shards: stage 1 (256px) and stage 2 (512px), on Ray Train.

`run(cfg, "stage1")` launches `train_worker` on every Ray Train worker (DDP, or FSDP2 for the large
configurations; `use_ray: false` runs it in this process). The worker resumes from the stage's
newest checkpoint when there is one: weights, optimizer, step, data position and RNG states, so the
batches and losses that follow are exactly those of an uninterrupted run. Without a checkpoint,
`init_from` gives the starting weights only (stage 2 from stage 1: fresh optimizer and step).

`train_step` is a plain function (micro-batches in, one optimizer step out) that the worker, the
tests and the benchmark share.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import random
import resource
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

from tessera.config import RunConfig
from tessera.config.train import TrainConfig
from tessera.models.gpt import GPT, GPTConfig, gpt_config, load_weights, mfu
from tessera.pipelines.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint, stage_dir
from tessera.pipelines.codes_loader import CodesLoader, ShardIndex, _npy, tokens_folder
from tessera.pipelines.store import ShardStore

log = logging.getLogger(__name__)

# Dense bf16 peak per GPU, for MFU.
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0}


# The step ------------------------------------------------------------------------------------------
def image_loss(logits: torch.Tensor, codes: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Cross-entropy over the image tokens; samples without a caption (valid False) do not count."""
    per_token = F.cross_entropy(logits.flatten(0, 1).float(), codes.flatten(), reduction="none")
    if valid is None:
        return per_token.mean()
    weight = valid[:, None].expand_as(codes).flatten().float()
    return (per_token * weight).sum() / weight.sum().clamp(min=1)


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, micro_batches: list[dict], *,
               grad_clip: float = 1.0, device: torch.device | str = "cpu",
               autocast_dtype: torch.dtype | None = None) -> dict:
    """One optimizer step over the micro-batches (gradient accumulation); returns loss and grad norm."""
    model.train()
    device = torch.device(device)
    total = torch.zeros((), device=device)
    n = len(micro_batches)
    for i, batch in enumerate(micro_batches):
        codes = batch["codes"].to(device, non_blocking=True)
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
                logits = model(codes[:, :-1], cond, cond_mask)
            loss = image_loss(logits, codes, valid)
            (loss / n).backward()
        total += loss.detach()
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return {"loss": total / n, "grad_norm": grad_norm.detach()}


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW, LlamaGen's way: weight decay on parameters of 2 or more dims only; fused on CUDA."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.optim.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=peak_lr(cfg), betas=tuple(cfg.optim.betas),
                             fused=True if device.type == "cuda" else None)


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


# RNG states (every worker's, so a resumed run draws the same dropout and CFG masks) ------------
def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1])}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate((3, tuple(state["python"]), None))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# The worker --------------------------------------------------------------------------------------
@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")
    in_ray: bool = False


def _dist_context(use_ray: bool, use_gpu: bool) -> Dist:
    if use_ray:
        import ray.train
        import ray.train.torch

        ctx = ray.train.get_context()
        return Dist(ctx.get_world_rank(), ctx.get_world_size(), ray.train.torch.get_device(), True)
    if dist.is_available() and dist.is_initialized():  # launched by torchrun or the like
        rank, world = dist.get_rank(), dist.get_world_size()
        local = int(os.environ.get("LOCAL_RANK", rank))
        device = torch.device(f"cuda:{local}" if use_gpu and torch.cuda.is_available() else "cpu")
        return Dist(rank, world, device)
    device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
    return Dist(device=device)


def _all_gather(obj, d: Dist) -> list:
    if d.world == 1:
        return [obj]
    out = [None] * d.world
    dist.all_gather_object(out, obj)
    return out


def _mean(value: torch.Tensor, d: Dist) -> float:
    if d.world > 1:
        value = value.detach().clone()
        dist.all_reduce(value)
        value /= d.world
    return float(value)


def _wrap(model: GPT, cfg: TrainConfig, d: Dist) -> torch.nn.Module:
    if d.world > 1 and cfg.parallel == "fsdp":
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
            if d.device.type == "cuda" and cfg.bf16 else MixedPrecisionPolicy()
        for layer in model.layers:
            fully_shard(layer, mp_policy=mp)
        fully_shard(model, mp_policy=mp)
    elif d.world > 1:
        from torch.nn.parallel import DistributedDataParallel

        model = DistributedDataParallel(model, device_ids=[d.device.index] if d.device.type == "cuda" else None)
    if cfg.compile:
        model = torch.compile(model)
    return model


def _full_state(model: torch.nn.Module, optimizer, d: Dist) -> tuple[dict, dict]:
    """Unsharded model and optimizer states on CPU (works for plain, DDP and FSDP2 models)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

    opts = StateDictOptions(full_state_dict=True, cpu_offload=d.device.type == "cuda" or d.world > 1)
    return get_model_state_dict(model, options=opts), get_optimizer_state_dict(model, optimizer, options=opts)


def _load_full_state(model, optimizer, model_state: dict, optim_state: dict | None) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict

    opts = StateDictOptions(full_state_dict=True, strict=True)
    set_model_state_dict(model, model_state, options=opts)
    if optim_state is not None:
        set_optimizer_state_dict(model, optimizer, optim_state, options=opts)


def model_config_for(cfg: TrainConfig, caption_dim: int) -> GPTConfig:
    drop = cfg.dropout
    return gpt_config(cfg.model, vocab_size=cfg.vocab_size, caption_dim=caption_dim, text_rope=cfg.text_rope,
                      token_dropout=drop, resid_dropout=drop, ffn_dropout=drop)


def stored_feature_dim(store: ShardStore, resolution: int) -> int | None:
    """The caption-feature dim of the first stored {key}.t5.npy, if any sample has one."""
    folder = tokens_folder(resolution)
    for shard in store.done_shards(folder):
        index = ShardIndex(store, folder, shard)
        try:
            for key in index.keys:
                if "t5.npy" in index.members[key]:
                    return int(_npy(index.read(key, "t5.npy")).shape[1])
        finally:
            index.close()
    return None


class MetricsLog:
    """metrics.jsonl and TensorBoard under the stage directory (rank 0 only). On resume, lines of
    steps after the checkpoint are dropped so that the file reads like one uninterrupted run."""

    def __init__(self, run: ShardStore, resume_step: int, enabled: bool):
        self.run, self.enabled, self.writer = run, enabled, None
        self.lines: list[str] = []
        if not enabled:
            return
        if run.exists("metrics.jsonl"):
            with run.fs.open(run.path("metrics.jsonl"), "r") as f:
                self.lines = [ln for ln in f.read().splitlines() if ln and json.loads(ln)["step"] <= resume_step]
        if run.protocol in ("file", "local"):
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(run.path("tensorboard"), purge_step=resume_step + 1)

    def write(self, step: int, values: dict) -> None:
        if not self.enabled:
            return
        self.lines.append(json.dumps({"step": step, **values}))
        self.run.write_bytes(("\n".join(self.lines) + "\n").encode(), "metrics.jsonl")
        if self.writer is not None:
            for k, v in values.items():
                if isinstance(v, (int, float)) and math.isfinite(v):
                    self.writer.add_scalar(f"train/{k}", v, step)
            self.writer.flush()

    def image(self, step: int, png: bytes) -> None:
        if self.writer is not None:
            import io

            import numpy as np
            from PIL import Image

            self.writer.add_image("samples", np.asarray(Image.open(io.BytesIO(png))), step, dataformats="HWC")

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # peak RSS (kB on Linux)


def train_worker(conf: dict) -> dict:
    """The training loop of one worker. `conf` is plain data so that Ray can ship it."""
    cfg = TrainConfig.model_validate(conf["train"])
    d = _dist_context(conf["use_ray"], cfg.use_gpu)
    if d.device.type == "cuda":
        torch.cuda.set_device(d.device)
        torch.backends.cuda.matmul.allow_tf32 = True
    data = ShardStore(conf["data_root"])
    run = ShardStore(conf["run_dir"])
    text_encoder = None
    if conf.get("text_encoder"):
        from tessera.models.text_encoder import TextEncoder

        text_encoder = TextEncoder.from_pretrained(conf["text_encoder"], max_length=120, device=str(d.device))
    caption_dim = cfg.caption_dim or (text_encoder.dim if text_encoder else stored_feature_dim(data, cfg.data.resolution))
    if caption_dim is None:
        raise ValueError("no text encoder is configured and no sample has stored caption features; "
                         "set text_encoder (or caption_dim) for this stage")
    model_cfg = model_config_for(cfg, caption_dim)

    # Weights, optimizer, step and data position: resumed, or fresh (with init_from weights).
    ckpt_url = latest_checkpoint(run)
    ckpt = load_checkpoint(ckpt_url) if ckpt_url else None
    torch.manual_seed(cfg.data.seed)  # the same initial weights on every worker
    with torch.device(d.device):
        model = GPT(model_cfg, grid=cfg.data.resolution // 16)
    if ckpt is not None:
        saved = GPTConfig(**ckpt["config"]["model_config"])
        if saved != model_cfg:
            raise ValueError(f"{ckpt_url} was trained with {saved}, but the config now asks for {model_cfg}")
    elif conf.get("init_from"):
        load_weights(model, conf["init_from"])
        if d.rank == 0:
            log.info("Starting from the weights of %s (fresh optimizer and step).", conf["init_from"])
    model = _wrap(model, cfg, d)
    optimizer = build_optimizer(model, cfg, d.device)
    micro = cfg.micro_batch or cfg.global_batch // d.world
    accum = cfg.global_batch // (micro * d.world)
    loader = CodesLoader(data, cfg.data, cfg.global_batch, d.rank, d.world, text_encoder, caption_dim)
    step = 0
    if ckpt is not None:
        _load_full_state(model, optimizer, ckpt["model"], ckpt["optimizer"])
        loader.load_state_dict(ckpt["data"])
        step = int(ckpt["step"])
        set_rng_state(ckpt["rng"][d.rank] if d.rank < len(ckpt["rng"]) else ckpt["rng"][0])
        if d.rank == 0:
            log.info("Resuming %s from step %d (%s).", conf["stage"], step, ckpt_url)
    del ckpt
    raw_model: GPT = getattr(getattr(model, "_orig_mod", model), "module", getattr(model, "_orig_mod", model))

    metrics = MetricsLog(run, step, enabled=d.rank == 0)
    autocast = torch.bfloat16 if d.device.type == "cuda" and cfg.bf16 else None
    n_tokens = raw_model.num_image_tokens
    peak = (cfg.peak_tflops or next((v for k, v in PEAK_TFLOPS.items()
                                     if d.device.type == "cuda" and k in torch.cuda.get_device_name(d.device)), 0.0)) * 1e12
    saved_at = step
    window = {"time": 0.0, "wait": 0.0, "steps": 0}
    losses: list[float] = []
    stop_at = conf.get("stop_at")

    def checkpoint() -> None:
        model_state, optim_state = _full_state(model, optimizer, d)
        rngs = _all_gather(rng_state(), d)
        if d.rank == 0:
            payload = {"model": model_state, "optimizer": optim_state, "step": step, "data": loader.state_dict(),
                       "rng": rngs, "config": {"stage": conf["stage"], "resolution": cfg.data.resolution,
                                               "train": cfg.model_dump(mode="json"),
                                               "model_config": dataclasses.asdict(model_cfg)}}
            url = save_checkpoint(run, step, payload, cfg.keep_checkpoints)
            log.info("Saved checkpoint %s.", url)
        if d.world > 1:
            dist.barrier()

    try:
        while step < cfg.max_steps and (stop_at is None or step < stop_at):
            t0 = time.perf_counter()
            batches = [loader.next_batch() for _ in range(accum)]
            t1 = time.perf_counter()
            for group in optimizer.param_groups:
                group["lr"] = lr_at(cfg, step)
            out = train_step(model, optimizer, batches, grad_clip=cfg.optim.grad_clip, device=d.device,
                             autocast_dtype=autocast)
            loss = _mean(out["loss"], d)
            if d.device.type == "cuda":
                torch.cuda.synchronize(d.device)
            step += 1
            losses.append(loss)
            window["time"] += time.perf_counter() - t0
            window["wait"] += t1 - t0
            window["steps"] += 1
            if step % cfg.log_every == 0 or step == cfg.max_steps:
                seconds = window["time"] / window["steps"]
                tokens_per_s = cfg.global_batch * n_tokens / seconds
                values = {"loss": loss, "grad_norm": float(out["grad_norm"]), "lr": lr_at(cfg, step - 1),
                          "tokens_per_s": tokens_per_s, "images_per_s": cfg.global_batch / seconds,
                          "data_wait": window["wait"] / window["time"], "memory_gb": _memory_gb(d.device),
                          "epoch": loader.state_dict()["epoch"], "skipped_samples": sum(loader.skipped.values())}
                if peak:
                    values["mfu"] = mfu(model_cfg, model_cfg.cls_token_num + n_tokens, tokens_per_s, peak * d.world)
                metrics.write(step, values)
                if d.in_ray:
                    import ray.train

                    ray.train.report({"step": step, **values})
                if d.rank == 0:
                    log.info("%s step %d/%d: loss %.4f, grad norm %.3f, %.0f tokens/s, data wait %.0f%%.",
                             conf["stage"], step, cfg.max_steps, loss, values["grad_norm"], tokens_per_s,
                             100 * values["data_wait"])
                window = {"time": 0.0, "wait": 0.0, "steps": 0}
            if step % cfg.checkpoint_every == 0 or step == cfg.max_steps:
                checkpoint()
                saved_at = step
            # Sharded (FSDP) weights would need every worker to generate: grids are for DDP and one worker.
            if (cfg.sample_every and step % cfg.sample_every == 0 and d.rank == 0 and conf.get("vq")
                    and not (cfg.parallel == "fsdp" and d.world > 1)):
                _sample_grid(raw_model, conf, cfg, text_encoder, run, step, metrics)
    finally:
        loader.close()
        metrics.close()
    if loader.skipped and d.rank == 0:
        log.warning("Skipped samples: %s.", dict(loader.skipped))
    return {"step": step, "saved_at": saved_at, "losses": losses, "skipped": dict(loader.skipped)}


def _sample_grid(model: GPT, conf: dict, cfg: TrainConfig, text_encoder, run: ShardStore, step: int,
                 metrics: MetricsLog) -> None:
    """A PNG grid of the fixed prompts, with the torch RNG put back so training is unaffected."""
    import io

    from tessera.models.vq import load_vq
    from tessera.pipelines.sample import render, save_grid

    if text_encoder is None:
        return
    state = rng_state()
    try:
        device = next(model.parameters()).device
        vq = load_vq(conf["vq"], device=str(device))
        generator = torch.Generator(device).manual_seed(cfg.data.seed)
        images, _ = render(model, vq, text_encoder, cfg.sample_prompts, generator=generator,
                           cfg_scale=4.0, temperature=1.0, top_k=1000, top_p=1.0)
        buf = io.BytesIO()
        save_grid(images, buf, labels=list(cfg.sample_prompts))
        run.write_bytes(buf.getvalue(), "samples", f"step-{step:08d}.png")
        metrics.image(step, buf.getvalue())
    finally:
        set_rng_state(state)
        model.train()


# The stage ---------------------------------------------------------------------------------------
@dataclass
class TrainResult:
    stage: str
    run_dir: str
    step: int
    checkpoint: str | None
    first_loss: float | None
    last_loss: float | None
    skipped: dict

    def funnel(self) -> list[dict]:
        """Samples the loader skipped since the stage (re)started (unreadable, wrong grid, ...)."""
        return [{"stage": self.stage, "outcome": "dropped", "reason": r, "count": n}
                for r, n in sorted(self.skipped.items())]


def read_metrics(run_dir: str) -> list[dict]:
    run = ShardStore(run_dir)
    if not run.exists("metrics.jsonl"):
        return []
    with run.fs.open(run.path("metrics.jsonl"), "r") as f:
        return [json.loads(ln) for ln in f.read().splitlines() if ln]


def worker_conf(cfg: RunConfig, stage: str, run_name: str | None = None, stop_at: int | None = None) -> dict:
    """What every worker needs, as plain data; tiny model references are built here, once."""
    from tessera.models.tiny import resolve

    tcfg: TrainConfig | None = getattr(cfg, stage)
    if tcfg is None:
        raise ValueError(f"the run config {cfg.name!r} has no {stage} section")
    run_name = run_name or cfg.name
    run_dir = stage_dir(cfg.runs_root, run_name, stage)
    if "://" not in run_dir:
        run_dir = os.path.abspath(run_dir)
    init_from = tcfg.init_from
    if init_from and latest_checkpoint(ShardStore(run_dir)) is None:
        # "stage1": this run's stage 1; "RUN/stage1": another run's, under the same runs_root.
        source_run, _, source_stage = init_from.rpartition("/")
        if source_stage in ("stage1", "stage2") and "://" not in init_from:
            source_run = source_run or run_name
            source = latest_checkpoint(ShardStore(stage_dir(cfg.runs_root, source_run, source_stage)))
            if source is None:
                raise FileNotFoundError(f"{stage} starts from {init_from}, but run {source_run!r} has no "
                                        f"{source_stage} checkpoint under {cfg.runs_root}; train {source_stage} first")
            init_from = source
        else:
            init_from = resolve(init_from, cfg.models_root)
    return {"train": tcfg.model_dump(mode="json"), "stage": stage, "run_dir": run_dir,
            "data_root": cfg.data_root, "use_ray": tcfg.use_ray, "init_from": init_from, "stop_at": stop_at,
            "text_encoder": resolve(tcfg.text_encoder, cfg.models_root) if tcfg.text_encoder else None,
            "vq": resolve(tcfg.vq, cfg.models_root) if tcfg.vq else None}


def run(cfg: RunConfig, stage: str, run_name: str | None = None, stop_at: int | None = None) -> TrainResult:
    """Train (or resume) one stage of a run; returns where it ended."""
    conf = worker_conf(cfg, stage, run_name, stop_at)
    tcfg = TrainConfig.model_validate(conf["train"])
    if tcfg.use_ray:
        from ray.train import RunConfig as RayRunConfig
        from ray.train import ScalingConfig
        from ray.train.torch import TorchConfig, TorchTrainer

        from tessera.pipelines.raytools import init_ray

        init_ray(cfg.ray)
        trainer = TorchTrainer(
            train_worker, train_loop_config=conf,
            scaling_config=ScalingConfig(num_workers=tcfg.num_workers, use_gpu=tcfg.use_gpu),
            torch_config=TorchConfig(backend="nccl" if tcfg.use_gpu else "gloo"),
            run_config=RayRunConfig(name=f"{run_name or cfg.name}-{stage}",
                                    storage_path=conf["run_dir"] + "/ray"),
        )
        trainer.fit()
        step = None
    else:
        step = train_worker(conf)["step"]
    history = read_metrics(conf["run_dir"])
    ckpt = latest_checkpoint(ShardStore(conf["run_dir"]))
    unusable = history[-1].get("skipped_samples", 0) if history else 0
    skipped = {"unusable_sample": unusable} if unusable else {}
    if ckpt:
        # The step counter of the newest checkpoint is where the stage stands.
        step = int(ckpt.rsplit("step-", 1)[1].removesuffix(".pt")) if step is None else step
    return TrainResult(stage=stage, run_dir=conf["run_dir"], step=step or 0, checkpoint=ckpt,
                       first_loss=history[0]["loss"] if history else None,
                       last_loss=history[-1]["loss"] if history else None, skipped=skipped)
