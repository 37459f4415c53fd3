"""What every flow shares: logging and progress artifacts."""
from __future__ import annotations

import logging
import os

from prefect import get_run_logger
from prefect.artifacts import create_progress_artifact, create_table_artifact, update_progress_artifact


os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")


def logger() -> logging.Logger | logging.LoggerAdapter:
    try:
        return get_run_logger()
    except Exception:  # noqa: BLE001 - outside a flow run, log plainly
        return logging.getLogger("tessera")


class ShardProgress:
    """A Prefect progress artifact that counts finished shards of one stage."""

    def __init__(self, stage: str, total: int):
        self.stage, self.total, self.done = stage, max(total, 1), 0
        self.artifact = create_progress_artifact(0.0, key=f"{stage.replace('_', '-')}-progress",
                                                 description=f"{stage}: shards finished")

    def __call__(self, shard: str, _result=None) -> None:
        self.done += 1
        update_progress_artifact(self.artifact, 100.0 * self.done / self.total)


def publish_table(key: str, rows: list[dict], description: str) -> None:
    create_table_artifact(key=key, table=rows, description=description)
