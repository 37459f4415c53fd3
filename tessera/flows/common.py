"""What every flow shares: logging, retries and progress artifacts."""
from __future__ import annotations

import logging
import os
import time

from prefect import get_run_logger
from prefect.artifacts import create_progress_artifact, create_table_artifact, update_progress_artifact
from prefect.cache_policies import NO_CACHE

from tessera.core.errors import is_permanent
from tessera.core.runtime import ShardFailures
from tessera.core.store import ShardStore

# Seconds between two progress updates sent to the Prefect server.
PROGRESS_INTERVAL_S = 5.0
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")


def retry_transient(task, task_run, state) -> bool:
    """Prefect's retry condition: retry what may pass (a lost connection, a dead worker), never what
    cannot (bad input, a missing file or model, a bad config), nor shards the runtime has already
    retried (ShardFailures: a rerun redoes exactly those)."""
    error = state.data if isinstance(state.data, BaseException) else state.result(raise_on_failure=False)
    return not (isinstance(error, BaseException) and (is_permanent(error) or isinstance(error, ShardFailures)))


# The task options of every data stage (RETRIES) and of training and evaluation (RETRY_ONCE, which
# resume from their own checkpoints and shards).
RETRIES = dict(retries=2, retry_delay_seconds=[10, 60], retry_condition_fn=retry_transient, cache_policy=NO_CACHE)
RETRY_ONCE = dict(retries=1, retry_delay_seconds=30, retry_condition_fn=retry_transient, cache_policy=NO_CACHE)


def logger() -> logging.Logger | logging.LoggerAdapter:
    try:
        return get_run_logger()
    except Exception:  # noqa: BLE001 - outside a flow run, log plainly
        return logging.getLogger("tessera")


class Throttle:
    """Says when something may happen again: at most once every `interval_s` seconds, or now when forced."""

    def __init__(self, interval_s: float, clock=time.monotonic):
        self.interval_s, self.clock = interval_s, clock
        self.last = clock()

    def ready(self, force: bool = False) -> bool:
        now = self.clock()
        if force or now - self.last >= self.interval_s:
            self.last = now
            return True
        return False


class ShardProgress:
    """A Prefect progress artifact of one stage's shards done, those an earlier run finished
    included: a rerun starts where the stage stands and ends at 100%. The server is told at most
    once every PROGRESS_INTERVAL_S seconds (and when the last shard is done), not once per shard."""

    def __init__(self, stage: str, shards: list[str], store: ShardStore):
        self.stage, self.total = stage, max(len(shards), 1)
        self.done = len(set(store.done_shards(stage)) & set(shards))
        self.artifact = create_progress_artifact(self._percent(), key=f"{stage.replace('_', '-')}-progress",
                                                 description=f"{stage}: shards finished")
        self.throttle = Throttle(PROGRESS_INTERVAL_S)

    def _percent(self) -> float:
        return min(100.0, 100.0 * self.done / self.total)

    def __call__(self, shard: str, _result=None) -> None:
        self.done += 1
        if self.throttle.ready(force=self.done >= self.total):
            update_progress_artifact(self.artifact, self._percent())


def publish_table(key: str, rows: list[dict], description: str) -> None:
    create_table_artifact(key=key, table=rows, description=description)
