"""Prefect tasks of the demo's self-check: each stage against the synthetic world's truth.

They run only when the source is synthetic and its truth file exists; nothing else reads it.
"""
from __future__ import annotations

import os

from prefect import task
from prefect.cache_policies import NO_CACHE

from tessera.config import RunConfig
from tessera.core.store import ShardStore
from tessera.demo import truth
from tessera.demo.synthetic import truth_path
from tessera.flows.common import logger, publish_table
from tessera.flows.filter_tasks import report_task
from tessera.pipelines.score import model_path


def truth_file(cfg: RunConfig) -> str | None:
    if cfg.source.synthetic is None:
        return None
    path = truth_path(cfg.source.path)
    return path if os.path.exists(path) else None


@task(name="truth-filters", cache_policy=NO_CACHE)
def truth_filters_task(cfg: RunConfig, store: ShardStore) -> dict | None:
    path = truth_file(cfg)
    if path is None:
        return None
    metrics = truth.measure_filters(store, path)
    rows = truth.filter_rows(metrics)
    publish_table("truth-filters", rows, "Per filter: planted defects caught and clean samples flagged "
                                         "(reports/truth.json).")
    for r in rows:
        caught = f"caught {r['caught']} ({r['caught %']}%) of {r['planted defect']}; " if r["planted defect"] else ""
        logger().info("Truth, %s: %sclean flagged %s (%s%%).", r["filter"], caught, r["clean flagged"],
                      r["clean flagged %"])
    return metrics


@task(name="truth-captions-tokens", cache_policy=NO_CACHE)
def truth_later_task(cfg: RunConfig, store: ShardStore) -> dict | None:
    path = truth_file(cfg)
    if path is None:
        return None
    out = {}
    if cfg.caption.enabled and store.done_shards("caption"):
        out["captions"] = truth.measure_captions(store, path)
        rows = truth.caption_rows(out["captions"])
        publish_table("truth-captions", rows, "Generated captions against the truth (reports/truth.json).")
        logger().info("Truth, captions: %s", rows[0])
    out["tokenizer"] = truth.measure_tokenizer(store, model_path(cfg.tokenize.vq, cfg.models_root),
                                               cfg.tokenize.resolutions, vq_config=cfg.tokenize.vq_config,
                                               ema=cfg.tokenize.vq_ema)
    rows = truth.tokenizer_rows(out["tokenizer"])
    publish_table("truth-tokenizer", rows, "VQ reconstruction error on kept samples (reports/truth.json).")
    logger().info("Truth, tokenizer: %s", rows)
    return out


def truth_report_task(cfg: RunConfig, store: ShardStore) -> str:
    """The filter report again, with the truth section after the funnel."""
    funnel = store.read_table("reports", "funnel.parquet").to_pylist()
    section = truth.truth_section(store.read_json(*truth.REPORT))
    return report_task(store, funnel, cfg.filters.report_examples, sections=[section])
