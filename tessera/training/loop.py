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
from dataclasses import dataclass, field

import torch

from tessera.config.train import TrainConfig
from tessera.core.store import ShardStore
from tessera.core.token_shards import ShardIndex, decode_npy, tokens_folder
from tessera.models.gpt import GPT, GPTConfig, gpt_config, load_weights, mfu
from tessera.models.identity import Identity, identity_of, settle
from tessera.models.text_encoder import TextEncoder
from tessera.models.vq import load_vq
from tessera.training.checkpoint import (
    Checkpointer,
    barrier,
    latest_checkpoint,
    read_checkpoint_any,
    read_train_state,
)
from tessera.training.data import CodesLoader
from tessera.training.grid import grid_writer, sample_grid
from tessera.training.metrics import MetricsLog
from tessera.training.parallel import dist_context, mean_over_workers, parallelize
from tessera.training.step import build_optimizer, lr_at, seed_step, split, train_step

log = logging.getLogger(__name__)

# Dense bf16 peak per GPU, for MFU.
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0}


def model_config_for(cfg: TrainConfig, caption_dim: int, source: Identity | None = None,
                     source_name: str = "the starting weights") -> GPTConfig:
    """The model config a stage trains: the config's values, text_rope and rope_grid settled against
    the identity of the weights it starts from (None: from scratch)."""
    text_rope, rope_grid = settle(cfg.text_rope, cfg.rope_grid, source, cfg.identity_override, source_name)
    drop = cfg.dropout
    return gpt_config(cfg.model, vocab_size=cfg.vocab_size, caption_dim=caption_dim, text_rope=text_rope,
                      rope_grid=rope_grid, token_dropout=drop, resid_dropout=drop, ffn_dropout=drop,
                      class_dropout=cfg.class_dropout)


def starting_identity(ckpt_url: str | None, init_from: str | None) -> tuple[Identity | None, dict | None, str]:
    """The identity of the weights a stage starts from: its own newest checkpoint (resume), else
    init_from (whose loaded checkpoint is returned too, to load its weights), else none."""
    if ckpt_url is not None:
        return identity_of(read_train_state(ckpt_url), ckpt_url), None, f"this stage's checkpoint {ckpt_url}"
    if init_from:
        init_ckpt = read_checkpoint_any(init_from)
        return identity_of(init_ckpt, init_from), init_ckpt, f"the weights of {init_from}"
    return None, None, ""


def stored_feature_dim(store: ShardStore, resolution: int) -> int | None:
    """The caption-feature dim of the first stored {key}.t5.npy, if any sample has one."""
    folder = tokens_folder(resolution)
    for shard in store.done_shards(folder):
        index = ShardIndex(store, folder, shard)
        for key in index.keys:
            if "t5.npy" in index.members[key]:
                return int(decode_npy(index.read(key, "t5.npy")).shape[1])
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


@dataclass(frozen=True)
class TrainJob:
    """What every worker of a stage needs: the stage's config and where things are (local paths or
    URLs, every model reference already resolved). Ray ships it to each worker as it is."""
    train: TrainConfig
    stage: str
    run_dir: str
    data_root: str
    use_ray: bool = False
    init_from: str | None = None  # a checkpoint to take the first weights from
    stop_at: int | None = None  # stop (after checkpointing) at this step, before max_steps
    text_encoder: str | None = None
    vq: str | None = None


def train_worker(job: TrainJob | dict) -> dict:
    """The training loop of one worker; Ray Train passes {"job": job}. Returns where it ended."""
    job = job["job"] if isinstance(job, dict) else job
    worker = Worker(job)
    try:
        worker.resume()
        worker.train()
    finally:
        worker.close()
    return worker.summary()


class Worker:
    """One worker's stage: its device and stores, text encoder, model, optimizer, loader and checkpoints."""

    def __init__(self, job: TrainJob):
        self.job, cfg = job, job.train
        self.cfg = cfg
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        d = self.d = dist_context(job.use_ray, cfg.use_gpu)
        if d.device.type == "cuda":
            torch.cuda.set_device(d.device)
            torch.backends.cuda.matmul.allow_tf32 = True
        self.data, self.run = ShardStore(job.data_root), ShardStore(job.run_dir)
        self.text_encoder = self._text_encoder()
        caption_dim = cfg.caption_dim or (self.text_encoder.dim if self.text_encoder
                                          else stored_feature_dim(self.data, cfg.data.resolution))
        if caption_dim is None:
            raise ValueError("no text encoder is configured and no sample has stored caption features; "
                             "set text_encoder (or caption_dim) for this stage")
        self.ckpt_url = latest_checkpoint(self.run)
        source, init_ckpt, source_name = starting_identity(self.ckpt_url, job.init_from)
        self.model_cfg = model_config_for(cfg, caption_dim, source, source_name)
        self.raw_model = self._model(init_ckpt)
        self.model = parallelize(self.raw_model, cfg, d)
        self.optimizer = build_optimizer(self.model, cfg, d.device)
        self.loader = CodesLoader(self.data, cfg.data, cfg.global_batch, d.rank, d.world, self.text_encoder,
                                  caption_dim, pin_memory=d.device.type == "cuda",
                                  text_positions=self.model_cfg.cls_token_num, vocab_size=self.model_cfg.vocab_size)
        self.checkpointer = Checkpointer(self.run, cfg.keep_checkpoints, d.rank, cfg.async_checkpoint)
        self.step = self.saved_at = 0
        self._vq = None  # loaded for the first sample grid
        self.losses: list[float] = []
        self.metrics: MetricsLog | None = None
        self.train_state = {"config": {"stage": job.stage, "resolution": cfg.data.resolution,
                                       "train": cfg.model_dump(mode="json"),
                                       "model_config": dataclasses.asdict(self.model_cfg)}}

    def _text_encoder(self) -> TextEncoder | None:
        if not self.job.text_encoder:
            return None
        cuda = self.d.device.type == "cuda"
        return TextEncoder.from_pretrained(self.job.text_encoder, max_length=gpt_config(self.cfg.model).cls_token_num,
                                           device=str(self.d.device),
                                           dtype=torch.bfloat16 if cuda and self.cfg.bf16 else None,
                                           clean=self.cfg.caption_clean)

    def _model(self, init_ckpt: dict | None) -> GPT:
        """Built for one device with the same initial weights on every worker (init_from's when
        given); parallelized later."""
        torch.manual_seed(self.cfg.data.seed)
        with torch.device(self.d.device):
            model = GPT(self.model_cfg, grid=self.cfg.data.resolution // 16)
        if init_ckpt is not None:
            load_weights(model, init_ckpt)
            if self.d.rank == 0:
                log.info("Starting from the weights of %s (fresh optimizer and step; text_rope %s, rope_grid %s).",
                         self.job.init_from, self.model_cfg.text_rope, self.model_cfg.rope_grid)
        return model

    def resume(self) -> None:
        """From the stage's newest checkpoint: weights, optimizer, step and the loader's position."""
        if self.ckpt_url is not None:
            state = Checkpointer.load(self.ckpt_url, self.model, self.optimizer)
            saved = GPTConfig(**state["config"]["model_config"])
            if saved != self.model_cfg:
                raise ValueError(f"{self.ckpt_url} was trained with {saved}, but the config now asks for {self.model_cfg}")
            self.loader.load_state_dict(state["data"])
            self.step = self.saved_at = int(state["step"])
            if self.d.rank == 0:
                log.info("Resuming %s from step %d (%s) on %d workers.", self.job.stage, self.step, self.ckpt_url,
                         self.d.world)
        self.metrics = MetricsLog(self.run, self.step, enabled=self.d.rank == 0, tensorboard=self.cfg.tensorboard)

    def train(self) -> None:
        cfg, d, stop_at = self.cfg, self.d, self.job.stop_at
        autocast = torch.bfloat16 if d.device.type == "cuda" and cfg.bf16 else None
        window = Window()
        while self.step < cfg.max_steps and (stop_at is None or self.step < stop_at):
            t0 = time.perf_counter()
            batch = self.loader.next_batch()
            window.wait += time.perf_counter() - t0
            for group in self.optimizer.param_groups:
                group["lr"] = lr_at(cfg, self.step)
            seed_step(cfg.data.seed, d.rank, self.step)
            out = train_step(self.model, self.optimizer, split(batch, cfg.micro_batch_for(d.world)),
                             grad_clip=cfg.optim.grad_clip, device=d.device, autocast_dtype=autocast)
            self.step += 1
            window.losses.append(out["loss"])
            window.grad_norm = out["grad_norm"]
            if self.step % cfg.log_every == 0 or self.step == cfg.max_steps or self.step == stop_at:
                self.log(window)
                window = Window()
            if self.step % cfg.checkpoint_every == 0 or self.step == cfg.max_steps:
                self.save()
            if cfg.sample_every and self.step % cfg.sample_every == 0:
                self.sample_grid()
        self.checkpointer.wait()
        barrier()

    def sample_grid(self) -> None:
        """Every worker draws its share of the prompts (grid.py). Sharded (FSDP) weights are not
        whole on any worker, so grids are drawn under DDP and on one worker only."""
        d, cfg = self.d, self.cfg
        if not self.job.vq or self.text_encoder is None or (cfg.parallel == "fsdp" and d.world > 1):
            return
        if self._vq is None:
            try:
                self._vq = load_vq(self.job.vq, device=str(d.device))
            except Exception as e:  # noqa: BLE001 - this worker then hands in no images; none may stop
                log.warning("Worker %d cannot load the VQ model for sample grids: %s", d.rank, e)
        sample_grid(self.raw_model, self._vq, self.text_encoder, list(cfg.sample_prompts), cfg.data.seed, d.rank,
                    d.world, grid_writer(self.run, self.metrics, self.step))

    def log(self, window: "Window") -> None:
        """The one place the host waits for the device: every log_every steps."""
        cfg, d = self.cfg, self.d
        step_losses = mean_over_workers(torch.stack(window.losses), d).tolist()
        self.losses += step_losses
        seconds = (time.perf_counter() - window.start) / len(step_losses)
        n_tokens = self.raw_model.num_image_tokens
        tokens_per_s = cfg.global_batch * n_tokens / seconds
        values = {"loss": step_losses[-1], "grad_norm": float(window.grad_norm), "lr": lr_at(cfg, self.step - 1),
                  "tokens_per_s": tokens_per_s, "images_per_s": cfg.global_batch / seconds,
                  "data_wait": window.wait / (seconds * len(step_losses)), "memory_gb": memory_gb(d.device),
                  "epoch": self.loader.state_dict()["epoch"], "skipped_samples": sum(self.loader.skipped.values())}
        peak = peak_flops(cfg, d.device)
        if peak:
            values["mfu"] = mfu(self.model_cfg, n_tokens, cfg.global_batch / seconds, peak * d.world)
        # The driver prints the step lines from metrics.jsonl (MetricsTail), once each: no line
        # here, and no ray.train.report, whose own log line would double every step.
        self.metrics.write(self.step, values)

    def save(self) -> None:
        url = self.checkpointer.save(self.step, self.model, self.optimizer,
                                     {"data": self.loader.state_dict(), **self.train_state})
        if self.d.rank == 0:
            log.info("Saved checkpoint %s%s.", url, " (in the background)" if self.cfg.async_checkpoint else "")
        self.saved_at = self.step

    def close(self) -> None:
        self.loader.close()
        if self.metrics is not None:
            self.metrics.close()
        if self.loader.skipped and self.d.rank == 0:
            log.warning("Skipped samples: %s.", dict(self.loader.skipped))

    def summary(self) -> dict:
        return {"step": self.step, "saved_at": self.saved_at, "losses": self.losses,
                "skipped": dict(self.loader.skipped), "data": self.loader.state_dict()}


@dataclass
class Window:
    """The steps since the last log line: their losses (on the device), data wait, last grad norm."""
    start: float = field(default_factory=time.perf_counter)
    wait: float = 0.0
    losses: list = field(default_factory=list)
    grad_norm: torch.Tensor | None = None
