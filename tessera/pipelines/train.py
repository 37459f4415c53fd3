"""The training stages: stage 1 (256px) and stage 2 (512px), on Ray Train.

`run(cfg, "stage1")` launches `tessera.training.loop.train_worker` on every Ray Train worker
(DDP, or FSDP2 for the large configurations; `use_ray: false` runs it in this process) and
reports where the stage ended. The loop, parallelism, checkpoints and metrics live in
tessera.training.

Under torchrun every process runs this module (`tessera stage1 --launcher torchrun` starts them):

    torchrun --nproc-per-node 8 -m tessera.pipelines.train CONFIG --stage stage1 [--run-name NAME] [--set K=V]

each one a worker of the stage (use_ray false), in the process group the loop sets up from
torchrun's environment.
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import os
from dataclasses import dataclass
from typing import Callable

import torch.distributed as dist

from tessera.config import RunConfig, load_config
from tessera.config.train import TrainConfig
from tessera.core.funnel import DROPPED, StageResult, by_reason
from tessera.core.raytools import init_ray
from tessera.core.store import ShardStore
from tessera.models.identity import settle
from tessera.models.refs import resolve
from tessera.training.checkpoint import latest_checkpoint, stage_dir, step_of
from tessera.training.loop import TrainJob, starting_identity, train_worker
from tessera.training.metrics import MetricsTail, read_metrics

log = logging.getLogger(__name__)

__all__ = ["TrainJob", "TrainResult", "read_metrics", "run", "train_job", "train_worker"]


# The stage ---------------------------------------------------------------------------------------
@dataclass
class TrainResult(StageResult):
    stage: str
    run_dir: str
    step: int
    checkpoint: str | None
    first_loss: float | None
    last_loss: float | None
    skipped: dict

    def outcomes(self) -> list[tuple[str, str, str, int]]:
        """Samples the loader skipped since the stage (re)started (unreadable, wrong grid, ...)."""
        return by_reason(self.stage, DROPPED, self.skipped)


def train_job(cfg: RunConfig, stage: str, run_name: str | None = None, stop_at: int | None = None) -> TrainJob:
    """What every worker needs; model references are resolved (tiny ones built) here, once."""

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
    return TrainJob(train=tcfg, stage=stage, run_dir=run_dir, data_root=cfg.data_root, use_ray=tcfg.use_ray,
                    init_from=init_from, stop_at=stop_at,
                    text_encoder=resolve(tcfg.text_encoder, cfg.models_root) if tcfg.text_encoder else None,
                    vq=resolve(tcfg.vq, cfg.models_root) if tcfg.vq else None)


def step_line(stage: str, max_steps: int, row: dict) -> str:
    return (f"{stage} step {row['step']}/{max_steps}: loss {row['loss']:.4f}, grad norm {row['grad_norm']:.3f}, "
            f"{row['tokens_per_s']:.0f} tokens/s, data wait {100 * row['data_wait']:.0f}%.")


def run(cfg: RunConfig, stage: str, run_name: str | None = None, stop_at: int | None = None,
        on_step: Callable[[dict], None] | None = None) -> TrainResult:
    """Train (or resume) one stage of a run; returns where it ended. Each logged step's metrics go
    to `on_step` while it trains (default: one log line each), from this process only (under
    torchrun, from rank 0)."""
    job = train_job(cfg, stage, run_name, stop_at)
    follow = on_step or (lambda row: log.info(step_line(stage, job.train.max_steps, row)))
    tail = MetricsTail(job.run_dir, follow) if os.environ.get("RANK", "0") == "0" else contextlib.nullcontext()
    with tail:
        step = _train(cfg, stage, run_name, job)
    return _result(stage, job, step)


def _train(cfg: RunConfig, stage: str, run_name: str | None, job: TrainJob) -> int | None:
    tcfg = job.train
    # Refuse a text_rope / rope_grid that contradicts the starting weights here, in one line,
    # before any worker starts (the workers settle the same way).
    source, _, source_name = starting_identity(latest_checkpoint(ShardStore(job.run_dir)), job.init_from)
    settle(tcfg.text_rope, tcfg.rope_grid, source, tcfg.identity_override, source_name)
    if tcfg.use_ray:
        from ray.train import RunConfig as RayRunConfig
        from ray.train import ScalingConfig
        from ray.train.torch import TorchConfig, TorchTrainer


        init_ray(cfg.ray)
        trainer = TorchTrainer(
            train_worker, train_loop_config={"job": job},
            scaling_config=ScalingConfig(num_workers=tcfg.num_workers, use_gpu=tcfg.use_gpu),
            torch_config=TorchConfig(backend="nccl" if tcfg.use_gpu else "gloo"),
            run_config=RayRunConfig(name=f"{run_name or cfg.name}-{stage}",
                                    storage_path=job.run_dir + "/ray"),
        )
        trainer.fit()
        return None
    return train_worker(job)["step"]


def _result(stage: str, job: TrainJob, step: int | None) -> TrainResult:
    history = read_metrics(job.run_dir)
    ckpt = latest_checkpoint(ShardStore(job.run_dir))
    unusable = history[-1].get("skipped_samples", 0) if history else 0
    skipped = {"unusable_sample": unusable} if unusable else {}
    if ckpt:
        # The step counter of the newest checkpoint is where the stage stands.
        step = step_of(ckpt) if step is None else step
    return TrainResult(stage=stage, run_dir=job.run_dir, step=step or 0, checkpoint=ckpt,
                       first_loss=history[0]["loss"] if history else None,
                       last_loss=history[-1]["loss"] if history else None, skipped=skipped)


def main(argv: list[str] | None = None) -> None:
    """One torchrun process: a worker of the stage, without Ray."""
    parser = argparse.ArgumentParser(description="one torchrun worker of a training stage")
    parser.add_argument("config")
    parser.add_argument("--stage", choices=["stage1", "stage2"], required=True)
    parser.add_argument("--run-name", default=None)  # not --run: torchrun would take it for its --run-path
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        raise SystemExit("run this module under torchrun (RANK and WORLD_SIZE are not set)")
    cfg = load_config(args.config, [*args.overrides, f"{args.stage}.use_ray=false"])
    try:
        result = run(cfg, args.stage, run_name=args.run_name)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    if os.environ["RANK"] == "0":
        print(f"{result.stage}: step {result.step}, last loss {result.last_loss}, checkpoint {result.checkpoint}")


if __name__ == "__main__":
    main()
