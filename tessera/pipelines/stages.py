"""The data stages in the order they run, as declared by each (tessera.core.stage.Stage)."""
from __future__ import annotations

from tessera.config import RunConfig
from tessera.core.stage import Stage
from tessera.pipelines import caption, download, ingest, score, select, tokenize


def data_stages(cfg: RunConfig) -> list[Stage]:
    """The stages a run config's curation runs: the source is downloaded or read, captioning is optional."""
    first = download.STEP if cfg.source.kind == "laion_parquet" else ingest.STEP
    return [first, score.STEP, select.STEP, *([caption.STEP] if cfg.caption.enabled else []), tokenize.STEP]
