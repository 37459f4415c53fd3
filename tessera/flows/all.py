"""The `all` flow: curate, then train stage 1 (256px), stage 2 (512px), and sample, from one config;
with an `eval` section, the checkpoints are evaluated after each training stage.

Each step is a subflow, so the Prefect UI shows one run per step with its own tasks and
artifacts. Every step skips what is already done (finished shards, saved checkpoints), so
re-running `all` after a failure redoes only the unfinished work.
"""
from __future__ import annotations

from prefect import flow
from prefect.artifacts import create_markdown_artifact

from tessera.config import load_config
from tessera.core.store import ShardStore, viewable_link
from tessera.config.steps import STEPS, runnable_steps
from tessera.flows.common import logger
from tessera.flows.curate import curate
from tessera.flows.eval import eval_flow
from tessera.flows.train import sample, stage1, stage2

# After which step `eval` evaluates which checkpoints (stage 2's run also shows the earlier figures).
EVAL_AFTER = {"stage1": ["untrained", "stage1"], "stage2": ["stage2"]}


@flow(name="all", log_prints=True)
def all_stages(config: str, overrides: list[str] | None = None, run: str | None = None,
               steps: list[str] | None = None, wait: bool = False) -> dict:
    """Run the steps in order (default: every step whose section the config has); `run` names the
    training run; `wait` waits for another run's lease on the data_root instead of refusing.
    Returns each step's result."""
    overrides = list(overrides or [])
    unknown = [s for s in steps or [] if s not in STEPS]
    if unknown:
        raise ValueError(f"unknown step(s) {', '.join(unknown)}; choose from {', '.join(STEPS)}")
    cfg = load_config(config, overrides)  # a bad config fails here, before any step starts
    steps, skipped = runnable_steps(cfg, steps)
    if skipped:
        logger().info("Skipping %s: the config has no section for them.", ", ".join(skipped))
    flows = {"curate": curate, "stage1": stage1, "stage2": stage2, "sample": sample}
    results = {}
    evaluating = "eval" in steps and cfg.eval is not None
    for step in (s for s in STEPS if s in steps and s != "eval"):
        logger().info("Starting %s.", step)
        training = {"wait": wait} if step == "curate" else {"run": run}
        results[step] = flows[step](config=config, overrides=overrides, **training)
        if evaluating and step in EVAL_AFTER:
            wanted = [c for c in EVAL_AFTER[step] if c in cfg.eval.checkpoints]
            results[f"eval-{step}"] = eval_flow(config=config, overrides=overrides, run=run, checkpoints=wanted,
                                                tokenizer=step == "stage1")
    if evaluating and not any(s in steps for s in EVAL_AFTER):
        results["eval"] = eval_flow(config=config, overrides=overrides, run=run)
    publish_summary(cfg.data_root, results)
    return results


def publish_summary(data_root: str, results: dict) -> list[tuple[str, str]]:
    """One markdown artifact linking every report and output the steps wrote; returns the links."""

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
    evals = [results[k] for k in ("eval", "eval-stage2", "eval-stage1") if k in results]
    if evals and evals[0].get("page"):
        links.append(("evaluation: samples by prompt", evals[0]["page"]))
        links.append(("evaluation: metrics.jsonl", evals[0]["metrics_file"]))
    markdown = "\n".join(f"- [{title}]({viewable_link(str(url))})" for title, url in links)
    create_markdown_artifact(key="pipeline-outputs", markdown=markdown or "nothing was written",
                             description="Links to the reports and outputs of this run of `all`.")
    return links
