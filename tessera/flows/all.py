"""The `all` flow: curate, then train stage 1 (256px), stage 2 (512px), and sample, from one config.

Each step is a subflow, so the Prefect UI shows one run per step with its own tasks and
artifacts. Every step skips what is already done (finished shards, saved checkpoints), so
re-running `all` after a failure redoes only the unfinished work.
"""
from __future__ import annotations

import os

from prefect import flow
from prefect.artifacts import create_markdown_artifact

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
    cfg = load_config(config, overrides)  # a bad config fails here, before any step starts
    flows = {"curate": curate, "stage1": stage1, "stage2": stage2, "sample": sample}
    results = {}
    for step in (s for s in STEPS if s in steps):
        logger().info("Starting %s.", step)
        training = {} if step == "curate" else {"run": run}
        results[step] = flows[step](config=config, overrides=overrides, **training)
    publish_summary(cfg.data_root, results)
    return results


def _link(path: str) -> str:
    return path if "://" in path else f"file://{os.path.abspath(path)}"


def publish_summary(data_root: str, results: dict) -> list[tuple[str, str]]:
    """One markdown artifact linking every report and output the steps wrote; returns the links."""
    from tessera.pipelines.store import ShardStore

    store = ShardStore(data_root)
    links = [(f"reports/{name}", store.url("reports", name))
             for name in ("report.html", "funnel.parquet", "thresholds.json") if store.exists("reports", name)]
    for step in ("stage1", "stage2"):
        if step in results:
            links.append((f"{step} run (metrics, TensorBoard)", results[step]["run_dir"]))
            if results[step].get("checkpoint"):
                links.append((f"{step} checkpoint", results[step]["checkpoint"]))
    if "sample" in results:
        links.append(("sample grid", results["sample"]["grid"]))
    markdown = "\n".join(f"- [{title}]({_link(str(url))})" for title, url in links)
    create_markdown_artifact(key="pipeline-outputs", markdown=markdown or "nothing was written",
                             description="Links to the reports and outputs of this run of `all`.")
    return links
