"""The download stage for any source: a laion_parquet input is downloaded (download.py), the
other kinds are read (ingest.py). Both leave the same `download/{shard}.*` outputs."""
from __future__ import annotations

from tessera.config.download import DownloadConfig, SourceConfig
from tessera.config.ray import RayConfig
from tessera.core.store import ShardStore
from tessera.pipelines import download, ingest
from tessera.pipelines.intake import DownloadResult


def prepare(source: SourceConfig, cfg: DownloadConfig, store: ShardStore, ray_cfg: RayConfig) -> list[str]:
    """Cut the input into input shards (once; a rerun reuses them). Returns the shard names."""
    if source.kind == "laion_parquet":
        return download.prepare(source, cfg, store, ray_cfg)
    return ingest.prepare(source, cfg, store)


def run(source: SourceConfig, cfg: DownloadConfig, ray_cfg: RayConfig, store: ShardStore,
        on_shard=None) -> DownloadResult:
    """Download or read every shard not yet done; the stage's counts over all shards."""
    if source.kind == "laion_parquet":
        return download.run(source, cfg, ray_cfg, store, on_shard)
    return ingest.run(source, cfg, ray_cfg, store, on_shard)
