"""Prefect task of the curate flow's re-captioning, between select and tokenize."""
from __future__ import annotations

from prefect import task

from tessera.config import RunConfig
from tessera.flows.common import RETRIES, ShardProgress, logger, publish_table
from tessera.pipelines import caption
from tessera.core.store import ShardStore

@task(name="caption", **RETRIES)
def caption_task(cfg: RunConfig, store: ShardStore) -> caption.CaptionResult | None:
    if not cfg.caption.enabled:
        logger().info("Captioning is off (caption.enabled: false): tokenize uses the original captions.")
        return None
    shards = caption.input_shards(store)
    result = caption.run(cfg.caption, cfg.ray, store, cfg.models_root,
                         on_shard=ShardProgress("caption", shards, store))
    publish_table("captions", result.funnel(), f"Captions by {cfg.caption.model}: generated, or the original "
                  "caption with the reason the generated one was not used.")
    logger().info("Captioned %d kept samples with %s; %d fell back to the original caption (%s).",
                  result.rows_in, cfg.caption.model, sum(result.fallback.values()),
                  ", ".join(f"{n} {r}" for r, n in sorted(result.fallback.items())) or "none")
    return result
