"""Prefect flows `stage1`, `stage2` and `sample`: thin wrappers over tessera.pipelines.train/sample.

Training runs on Ray Train from the flow's process; rerunning a flow resumes from the stage's
newest checkpoint, so a retry never loses more than the steps since that checkpoint.
"""
from __future__ import annotations

from prefect import flow, task
from prefect.artifacts import (create_image_artifact, create_markdown_artifact, create_progress_artifact,
                                update_progress_artifact)

from tessera.config import load_config
from tessera.core.store import viewable_link
from tessera.flows.common import RETRY_ONCE, logger, publish_table
from tessera.pipelines import sample as sampling
from tessera.pipelines import train


class TrainingProgress:
    """While a stage trains: each logged step (every log_every steps) as a line of the flow run's log
    and as a progress artifact, step / max_steps, so the Prefect UI follows the run and a resumed
    run starts where it stands."""

    def __init__(self, stage: str, max_steps: int):
        self.stage, self.max_steps, self.log = stage, max_steps, logger()
        self.artifact = create_progress_artifact(0.0, key=f"{stage}-progress",
                                                 description=f"{stage}: steps done of {max_steps}")

    def __call__(self, row: dict) -> None:
        self.log.info(train.step_line(self.stage, self.max_steps, row))
        update_progress_artifact(self.artifact, min(100.0, 100.0 * row["step"] / self.max_steps))


@task(name="train", **RETRY_ONCE)
def train_task(config: str, overrides: list[str], stage: str, run: str | None) -> train.TrainResult:
    cfg = load_config(config, overrides)
    result = train.run(cfg, stage, run_name=run, on_step=TrainingProgress(stage, getattr(cfg, stage).max_steps))
    logger().info("%s stands at step %d; loss %s -> %s; checkpoint %s.", stage, result.step,
                  _fmt(result.first_loss), _fmt(result.last_loss), result.checkpoint)
    return result


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.4f}"


def _publish(result: train.TrainResult) -> None:
    history = train.read_metrics(result.run_dir)
    rows = [{k: (round(v, 4) if isinstance(v, float) else v) for k, v in m.items()} for m in history[-20:]]
    if rows:
        publish_table(f"{result.stage}-metrics", rows, f"The last logged steps of {result.stage} ({result.run_dir}).")
    create_markdown_artifact(key=f"{result.stage}-result", description=f"Where {result.stage} ended.", markdown=(
        f"**{result.stage}**: step {result.step}, loss {_fmt(result.first_loss)} -> {_fmt(result.last_loss)}\n\n"
        f"checkpoint: `{result.checkpoint}`\n\nmetrics and TensorBoard logs: `{result.run_dir}`"))


@flow(name="stage1", log_prints=True)
def stage1(config: str, overrides: list[str] | None = None, run: str | None = None) -> dict:
    """Train (or resume) stage 1 at 256px; returns where it ended."""
    result = train_task(config, list(overrides or []), "stage1", run)
    _publish(result)
    return result.__dict__


@flow(name="stage2", log_prints=True)
def stage2(config: str, overrides: list[str] | None = None, run: str | None = None) -> dict:
    """Train (or resume) stage 2 at 512px, starting from the stage-1 weights; returns where it ended."""
    result = train_task(config, list(overrides or []), "stage2", run)
    _publish(result)
    return result.__dict__


@flow(name="sample", log_prints=True)
def sample(config: str, overrides: list[str] | None = None, run: str | None = None,
           checkpoint: str | None = None) -> dict:
    """A PNG grid of the config's prompts from a checkpoint (default: the run's newest)."""
    cfg = load_config(config, list(overrides or []))
    result = sampling.run(cfg, run_name=run, checkpoint=checkpoint)
    logger().info("Sampled %d images from %s into %s (%.0f tokens/s).", result.images, result.checkpoint,
                  result.grid, result.tokens_per_s)
    if "://" in result.grid and not result.grid.startswith("file://"):
        create_image_artifact(image_url=viewable_link(result.grid), key="sample-grid", description="Samples")
    create_markdown_artifact(key="sample-result", description="Where the samples are.", markdown=(
        f"{result.images} images from `{result.checkpoint}`: [{result.grid}]({viewable_link(result.grid)}) "
        f"({result.tokens_per_s:.0f} tokens/s)"))
    return result.__dict__
