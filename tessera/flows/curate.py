"""The `curate` flow: download -> (score -> select -> caption -> tokenize) on Ray, from one config."""
from __future__ import annotations

from prefect import flow, task

from tessera.config import RunConfig, load_config
from tessera.flows.caption_tasks import caption_task
from tessera.flows.common import RETRIES, ShardProgress, logger, publish_table
from tessera.flows.filter_tasks import report_task, score_task, select_task
from tessera.flows.tokenize_tasks import tokenize_task
from tessera.pipelines import sources
from tessera.pipelines.intake import DownloadResult
from tessera.core.funnel import write_funnel
from tessera.core import resolved
from tessera.core.lease import Lease
from tessera.core.runtime import ShardFailures
from tessera.core.store import ShardStore


@task(name="download", **RETRIES)
def download_task(cfg: RunConfig, store: ShardStore) -> DownloadResult:
    shards = sources.prepare(cfg.source, cfg.download, store, cfg.ray)
    result = sources.run(cfg.source, cfg.download, cfg.ray, store,
                         on_shard=ShardProgress("download", shards, store))
    logger().info("Downloaded %d of %d rows; dropped %s.", result.downloaded, result.rows_in,
                  ", ".join(f"{n} {r}" for r, n in sorted(result.dropped.items())) or "none")
    return result


@flow(name="curate", log_prints=True)
def curate(config: str, overrides: list[str] | None = None, wait: bool = False) -> dict:
    """Curate the data set a run config names; returns the funnel rows. The run holds the
    data_root's lease throughout; `wait` waits for another run's lease instead of refusing."""
    cfg = load_config(config, overrides or [])
    store = ShardStore(cfg.data_root)
    with Lease(store, f"curate {cfg.name}", cfg.storage.lease_stale_after_s, wait=wait) as lease:
        # Saved once the lease is held: a run that is refused never replaces the holder's record.
        logger().info("Resolved config saved to %s.", resolved.save(cfg, "curate", cfg.data_root))
        return _curate(cfg, store, lease)


def _curate(cfg: RunConfig, store: ShardStore, lease: Lease) -> dict:
    funnel: list[dict] = []
    failed: dict[str, dict[str, str]] = {}

    def step(stage: str, result):
        lease.check()  # a run whose lease was taken over stops before its next stage
        if result is not None:
            funnel.extend(result.funnel())
            if result.failed:
                failed[stage] = result.failed
        return result

    step("download", download_task(cfg, store))
    step("score", score_task(cfg, store))
    step("select", select_task(cfg, store))
    report_task(store, funnel, cfg.filters.report_examples)
    step("caption", caption_task(cfg, store))
    step("tokenize", tokenize_task(cfg, store))
    url = write_funnel(store, funnel)
    publish_table("funnel", funnel, f"Rows kept and dropped per stage and reason ({url}).")
    logger().info("Funnel written to %s.", url)
    if failed:
        publish_table("failed-shards", [{"stage": stage, "shard": shard, "error": error}
                                        for stage, shards in failed.items() for shard, error in sorted(shards.items())],
                      "Shards that failed after every retry; a rerun redoes exactly these.")
        raise ShardFailures(failed)
    return {"funnel": funnel, "data_root": cfg.data_root}

