"""The training loop of one worker (Ray Train, torchrun, or this process alone).

Every step consumes `global_batch` samples: each worker takes its share from the loader and cuts
it into micro-batches of `micro_batch` (gradient accumulation). The worker resumes from the
stage's newest checkpoint when there is one (weights, optimizer, step, data position), on any
number of workers; randomness is seeded per (run seed, rank, step), so the batches and losses
that follow are exactly those of an uninterrupted run. Without a checkpoint, `init_from` gives
the starting weights only (stage 2 from stage 1: fresh optimizer and step).

Nothing in the step waits for the device: losses stay on it and are reduced every `log_every`.
"""
from __future__ import annotations

import dataclasses
import logging
import resource
import time

import torch

from tessera.config.train import TrainConfig
from tessera.core.store import ShardStore
from tessera.core.token_shards import ShardIndex, decode_npy, tokens_folder
from tessera.models.generation import render, save_grid
from tessera.models.gpt import GPT, GPTConfig, gpt_config, load_weights, mfu
from tessera.models.text_encoder import TextEncoder
from tessera.models.vq import load_vq
from tessera.training.checkpoint import (
    Checkpointer,
    barrier,
    latest_checkpoint,
    read_checkpoint_any,
)
from tessera.training.data import CodesLoader
from tessera.training.metrics import MetricsLog
from tessera.training.parallel import dist_context, mean_over_workers, parallelize
from tessera.training.step import build_optimizer, lr_at, seed_step, split, train_step

log = logging.getLogger(__name__)

# Dense bf16 peak per GPU, for MFU.
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0}


def model_config_for(cfg: TrainConfig, caption_dim: int) -> GPTConfig:
    drop = cfg.dropout
    return gpt_config(cfg.model, vocab_size=cfg.vocab_size, caption_dim=caption_dim, text_rope=cfg.text_rope,
                      rope_grid=cfg.rope_grid, token_dropout=drop, resid_dropout=drop, ffn_dropout=drop,
                      class_dropout=cfg.class_dropout)


def stored_feature_dim(store: ShardStore, resolution: int) -> int | None:
    """The caption-feature dim of the first stored {key}.t5.npy, if any sample has one."""
    folder = tokens_folder(resolution)
    for shard in store.done_shards(folder):
        index = ShardIndex(store, folder, shard)
        try:
            for key in index.keys:
                if "t5.npy" in index.members[key]:
                    return int(decode_npy(index.read(key, "t5.npy")).shape[1])
        finally:
            index.close()
    return None


def memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # peak RSS (kB on Linux)


def peak_flops(cfg: TrainConfig, device: torch.device) -> float:
    if cfg.peak_tflops:
        return cfg.peak_tflops * 1e12
    if device.type != "cuda":
        return 0.0
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_TFLOPS.items() if k in name), 0.0) * 1e12


def train_worker(conf: dict) -> dict:
    """The training loop of one worker. `conf` is plain data so that Ray can ship it."""
    cfg = TrainConfig.model_validate(conf["train"])
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    d = dist_context(conf["use_ray"], cfg.use_gpu)
    if d.device.type == "cuda":
        torch.cuda.set_device(d.device)
        torch.backends.cuda.matmul.allow_tf32 = True
    data = ShardStore(conf["data_root"])
    run = ShardStore(conf["run_dir"])
    text_encoder = None
    text_positions = gpt_config(cfg.model).cls_token_num
    if conf.get("text_encoder"):

        dtype = torch.bfloat16 if d.device.type == "cuda" and cfg.bf16 else None
        text_encoder = TextEncoder.from_pretrained(conf["text_encoder"], max_length=text_positions,
                                                   device=str(d.device), dtype=dtype)
    caption_dim = cfg.caption_dim or (text_encoder.dim if text_encoder else stored_feature_dim(data, cfg.data.resolution))
    if caption_dim is None:
        raise ValueError("no text encoder is configured and no sample has stored caption features; "
                         "set text_encoder (or caption_dim) for this stage")
    model_cfg = model_config_for(cfg, caption_dim)

    # The model, built for one device with the same initial weights on every worker, then parallelized.
    ckpt_url = latest_checkpoint(run)
    torch.manual_seed(cfg.data.seed)
    with torch.device(d.device):
        model = GPT(model_cfg, grid=cfg.data.resolution // 16)
    if ckpt_url is None and conf.get("init_from"):
        load_weights(model, read_checkpoint_any(conf["init_from"]))
        if d.rank == 0:
            log.info("Starting from the weights of %s (fresh optimizer and step).", conf["init_from"])
    raw_model = model
    model = parallelize(model, cfg, d)
    optimizer = build_optimizer(model, cfg, d.device)
    micro = cfg.micro_batch_for(d.world)
    loader = CodesLoader(data, cfg.data, cfg.global_batch, d.rank, d.world, text_encoder, caption_dim,
                         pin_memory=d.device.type == "cuda", text_positions=model_cfg.cls_token_num,
                         vocab_size=model_cfg.vocab_size)
    checkpointer = Checkpointer(run, cfg.keep_checkpoints, d.rank, cfg.async_checkpoint)
    step = 0
    if ckpt_url is not None:
        state = Checkpointer.load(ckpt_url, model, optimizer)
        saved = GPTConfig(**state["config"]["model_config"])
        if saved != model_cfg:
            raise ValueError(f"{ckpt_url} was trained with {saved}, but the config now asks for {model_cfg}")
        loader.load_state_dict(state["data"])
        step = int(state["step"])
        if d.rank == 0:
            log.info("Resuming %s from step %d (%s) on %d workers.", conf["stage"], step, ckpt_url, d.world)

    metrics = MetricsLog(run, step, enabled=d.rank == 0)
    autocast = torch.bfloat16 if d.device.type == "cuda" and cfg.bf16 else None
    n_tokens = raw_model.num_image_tokens
    peak = peak_flops(cfg, d.device)
    saved_at = step
    window = {"start": time.perf_counter(), "wait": 0.0, "losses": [], "grad_norm": None}
    losses: list[float] = []
    stop_at = conf.get("stop_at")
    train_state = {"config": {"stage": conf["stage"], "resolution": cfg.data.resolution,
                              "train": cfg.model_dump(mode="json"), "model_config": dataclasses.asdict(model_cfg)}}

    try:
        while step < cfg.max_steps and (stop_at is None or step < stop_at):
            t0 = time.perf_counter()
            batch = loader.next_batch()
            window["wait"] += time.perf_counter() - t0
            for group in optimizer.param_groups:
                group["lr"] = lr_at(cfg, step)
            seed_step(cfg.data.seed, d.rank, step)
            out = train_step(model, optimizer, split(batch, micro), grad_clip=cfg.optim.grad_clip,
                             device=d.device, autocast_dtype=autocast)
            step += 1
            window["losses"].append(out["loss"])
            window["grad_norm"] = out["grad_norm"]
            if step % cfg.log_every == 0 or step == cfg.max_steps or step == stop_at:
                # The one place the host waits for the device: every log_every steps.
                step_losses = mean_over_workers(torch.stack(window["losses"]), d).tolist()
                losses += step_losses
                seconds = (time.perf_counter() - window["start"]) / len(step_losses)
                tokens_per_s = cfg.global_batch * n_tokens / seconds
                values = {"loss": step_losses[-1], "grad_norm": float(window["grad_norm"]),
                          "lr": lr_at(cfg, step - 1), "tokens_per_s": tokens_per_s,
                          "images_per_s": cfg.global_batch / seconds,
                          "data_wait": window["wait"] / (seconds * len(step_losses)),
                          "memory_gb": memory_gb(d.device), "epoch": loader.state_dict()["epoch"],
                          "skipped_samples": sum(loader.skipped.values())}
                if peak:
                    values["mfu"] = mfu(model_cfg, model_cfg.cls_token_num + n_tokens, tokens_per_s, peak * d.world)
                metrics.write(step, values)
                if d.in_ray:
                    import ray.train

                    ray.train.report({"step": step, **values})
                if d.rank == 0:
                    log.info("%s step %d/%d: loss %.4f, grad norm %.3f, %.0f tokens/s, data wait %.0f%%.",
                             conf["stage"], step, cfg.max_steps, values["loss"], values["grad_norm"],
                             tokens_per_s, 100 * values["data_wait"])
                window = {"start": time.perf_counter(), "wait": 0.0, "losses": [], "grad_norm": None}
            if step % cfg.checkpoint_every == 0 or step == cfg.max_steps:
                url = checkpointer.save(step, model, optimizer, {"data": loader.state_dict(), **train_state})
                if d.rank == 0:
                    log.info("Saved checkpoint %s%s.", url, " (in the background)" if cfg.async_checkpoint else "")
                saved_at = step
            # Sharded (FSDP) weights would need every worker to generate: grids are for DDP and one worker.
            if (cfg.sample_every and step % cfg.sample_every == 0 and d.rank == 0 and conf.get("vq")
                    and not (cfg.parallel == "fsdp" and d.world > 1)):
                _sample_grid(raw_model, conf, cfg, text_encoder, run, step, metrics)
        checkpointer.wait()
        barrier()
    finally:
        loader.close()
        metrics.close()
    if loader.skipped and d.rank == 0:
        log.warning("Skipped samples: %s.", dict(loader.skipped))
    return {"step": step, "saved_at": saved_at, "losses": losses, "skipped": dict(loader.skipped),
            "data": loader.state_dict()}


def _sample_grid(model: GPT, conf: dict, cfg: TrainConfig, text_encoder, run: ShardStore, step: int,
                 metrics: MetricsLog) -> None:
    """A PNG grid of the fixed prompts (training reseeds every step, so this draws nothing from it)."""
    import io


    if text_encoder is None:
        return
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
        model.train()
