"""Prefect tasks of the curate flow's filtering: score, select, and the filter report."""
from __future__ import annotations

from prefect import task
from prefect.artifacts import create_link_artifact
from prefect.cache_policies import NO_CACHE

from tessera.config import RunConfig
from tessera.flows.common import RETRIES, ShardProgress, logger, publish_table
from tessera.pipelines import filter_report, score, select
from tessera.core.raytools import init_ray
from tessera.core.store import ShardStore, viewable_link

@task(name="score", **RETRIES)
def score_task(cfg: RunConfig, store: ShardStore) -> score.ScoreResult:
    shards = store.done_shards("download")
    result = score.run(cfg.filters, cfg.ray, store, cfg.models_root, on_shard=ShardProgress("score", shards, store))
    sources = ", ".join(f"{n} {'from ' + s['column'] if s['source'] == 'metadata' else s['source']}"
                        for n, s in sorted(result.sources.items()))
    logger().info("Scored %d samples in %d shards (%s); %d images unreadable.", result.samples, result.shards,
                  sources or "no model scores", sum(result.unreadable.values()))
    return result


@task(name="select", **RETRIES)
def select_task(cfg: RunConfig, store: ShardStore) -> select.SelectResult:
    shards = store.done_shards(score.STAGE)
    init_ray(cfg.ray)  # select and the report run their per-shard work as Ray tasks
    result = select.run(cfg.filters, store, on_shard=ShardProgress("select", shards, store))
    rows = [{"filter": name, **{k: str(v) for k, v in desc.items()}} for name, desc in result.thresholds["filters"].items()]
    publish_table("thresholds", rows, "The threshold of each filter, as applied (reports/thresholds.json).")
    logger().info("Kept %d of %d samples; dropped %s.", result.kept, result.samples,
                  ", ".join(f"{n} {r}" for r, n in sorted(result.dropped.items())) or "none")
    return result


@task(name="filter-report", cache_policy=NO_CACHE)
def report_task(store: ShardStore, funnel: list[dict], examples: int, sections: list[str] | None = None) -> str:
    url = filter_report.build(store, funnel, examples, sections or [])
    # On an object store the link is presigned: a browser opens it without credentials.
    create_link_artifact(key="filter-report", link=viewable_link(url), link_text="report.html",
                         description="Filter report: funnel, score histograms with thresholds, examples near each threshold.")
    logger().info("Filter report: %s", url)
    return url
