"""The `all` flow: curate, then train stage 1 (256px), stage 2 (512px), and sample, from one config.

Each step is a subflow, so the Prefect UI shows one run per step with its own tasks and
artifacts. Every step skips what is already done (finished shards, saved checkpoints), so
re-running `all` after a failure redoes only the unfinished work.
"""
from __future__ import annotations

from prefect import flow

from tessera.config import load_config
from tessera.flows.common import logger
from tessera.flows.curate import curate
from tessera.flows.train import sample, stage1, stage2

STEPS = ("curate", "stage1", "stage2", "sample")


@flow(name="all", log_prints=True)
def all_stages(config: str, overrides: list[str] | None = None, run: str | None = None,
               steps: list[str] | None = None) -> dict:
    """Run the steps in order (default: all); `run` names the training run. Returns each step's result."""
    overrides = list(overrides or [])
    steps = list(steps or STEPS)
    unknown = [s for s in steps if s not in STEPS]
    if unknown:
        raise ValueError(f"unknown step(s) {', '.join(unknown)}; choose from {', '.join(STEPS)}")
    load_config(config, overrides)  # a bad config fails here, before any step starts
    flows = {"curate": curate, "stage1": stage1, "stage2": stage2, "sample": sample}
    results = {}
    for step in (s for s in STEPS if s in steps):
        logger().info("Starting %s.", step)
        training = {} if step == "curate" else {"run": run}
        results[step] = flows[step](config=config, overrides=overrides, **training)
    return results
