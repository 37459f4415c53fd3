"""The funnel: how many rows each stage kept, and how many it dropped for each reason."""
from __future__ import annotations

import pyarrow as pa

from tessera.core.store import ShardStore

FUNNEL_SCHEMA = pa.schema([
    ("stage", pa.string()), ("outcome", pa.string()), ("reason", pa.string()), ("count", pa.int64()),
])


def write_funnel(store: ShardStore, rows: list[dict]) -> str:
    """Write `reports/funnel.parquet` (one row per stage, outcome and reason); returns its URL."""
    store.write_table(pa.Table.from_pylist(rows, schema=FUNNEL_SCHEMA), "reports", "funnel.parquet")
    return store.url("reports", "funnel.parquet")


def funnel_markdown(rows: list[dict]) -> str:
    lines = ["| stage | outcome | reason | count |", "|---|---|---|---:|"]
    lines += [f"| {r['stage']} | {r['outcome']} | {r['reason']} | {r['count']} |" for r in rows]
    return "\n".join(lines)


FAILED = "failed"
SHARD_FAILED = "shard_failed"


def failed_shard_rows(stage: str, failed: dict[str, str], rows: int) -> list[dict]:
    """The funnel row for the rows a stage could not process because their shard failed."""
    return [{"stage": stage, "outcome": FAILED, "reason": SHARD_FAILED, "count": rows}] if failed else []
