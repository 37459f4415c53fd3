"""The demo: Tessera's `all` flow on the synthetic world, served on loopback while it runs, then
every stage measured against the world's truth and the filter report rewritten with it.

Production code knows nothing of this: the demo passes in what it needs (the source it serves, the
held-out prompt set with its palette, the truth section of the report).
"""
from __future__ import annotations

import os
import posixpath
import time

from prefect import flow

from tessera.config import RunConfig, load_config
from tessera.core.store import ShardStore
from tessera.demo.prompts import write_heldout_prompts
from tessera.demo.synthetic import SyntheticSource
from tessera.demo.truth_tasks import truth_filters_task, truth_later_task, truth_report_task
from tessera.flows.all import STEPS, all_stages

HELDOUT = ("eval", "heldout")  # under data_root


def heldout_prompts(cfg: RunConfig) -> list[str]:
    """Write the held-out prompt set when the config evaluates without a prompt set of its own;
    returns the override that points evaluation at it."""
    if cfg.eval is None or cfg.eval.prompts:
        return []
    store = ShardStore(posixpath.join(cfg.data_root, *HELDOUT))
    return [f"eval.prompts={write_heldout_prompts(store, cfg.eval.synthetic_prompts, seed=cfg.eval.seed)}"]


@flow(name="demo", log_prints=True)
def demo_flow(config: str, overrides: list[str] | None = None, run: str | None = None,
              steps: list[str] | None = None) -> dict:
    """Serve the synthetic source, run `all` (or the given steps), then measure against the truth."""
    overrides = list(overrides or [])
    cfg = load_config(config, overrides)
    if cfg.source.synthetic is None:
        raise ValueError(f"{config}: the demo needs a `source.synthetic` section")
    overrides += heldout_prompts(cfg)
    with SyntheticSource(cfg.source.synthetic, cfg.source.path, cfg.download.timeout):
        results = all_stages(config=config, overrides=overrides, run=run, steps=steps)
    if "curate" in (steps or STEPS):
        store = ShardStore(cfg.data_root)
        results["truth"] = {"filters": truth_filters_task(cfg, store), **(truth_later_task(cfg, store) or {})}
        truth_report_task(cfg, store)
    return results


def demo_overrides(out: str, overrides: list[str]) -> list[str]:
    """The demo's roots and source under `out` (an absolute path), then the user's overrides."""
    return [f"data_root={out}/data", f"runs_root={out}/runs", f"models_root={out}/models",
            f"source.path={out}/source/laion-synthetic.parquet", *overrides]


def run_demo(config: str, out: str, overrides: list[str], steps: list[str] | None = None) -> int:
    """The `tessera demo` command: everything under `out`, and a map of what was written."""
    out = os.path.abspath(out)
    overrides = demo_overrides(out, overrides)
    cfg = load_config(config, overrides)  # fail fast, before Prefect starts
    start = time.time()
    demo_flow(config=config, overrides=overrides, steps=steps)
    tokens = ",".join(str(r) for r in cfg.tokenize.resolutions)
    print(f"\nThe demo finished in {time.time() - start:.0f} s. Everything it wrote is under {out}:")
    print(f"  {out}/data/download          image shards (img2dataset WebDataset tars + parquet)")
    print(f"  {out}/data/reports/funnel.parquet   rows kept and dropped, per stage and reason")
    print(f"  {out}/data/scores               per-sample scores, keep and reason (parquet)")
    print(f"  {out}/data/reports/report.html   the filter report: open it in a browser")
    print(f"  {out}/data/reports/truth.json    every stage measured against the synthetic world's truth")
    print(f"  {out}/data/tokens/{{{tokens}}}     WebDataset shards of VQ codes")
    print(f"  {out}/runs/{cfg.name}           stage-1 and stage-2 checkpoints, metrics, sample grids")
    return 0
