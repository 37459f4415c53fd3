"""The funnel: how many rows each stage kept, and how many it dropped for each reason."""
from __future__ import annotations

from dataclasses import dataclass, field

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
DROPPED = "dropped"


def failed_shard_rows(stage: str, failed: dict[str, str], rows: int) -> list[dict]:
    """The funnel row for the rows a stage could not process because their shard failed."""
    return [{"stage": stage, "outcome": FAILED, "reason": SHARD_FAILED, "count": rows}] if failed else []


def by_reason(stage: str, outcome: str, counts: dict[str, int]) -> list[tuple[str, str, str, int]]:
    """One outcome row per reason, in reason order."""
    return [(stage, outcome, reason, n) for reason, n in sorted(counts.items())]


@dataclass(kw_only=True)
class StageResult:
    """What a stage returns. `outcomes()` says what became of its rows, as (stage, outcome, reason,
    count); `funnel()` turns them into funnel rows, each stage's followed by its failed shards' rows."""
    failed: dict[str, str] = field(default_factory=dict)
    failed_rows: int = 0

    def outcomes(self) -> list[tuple[str, str, str, int]]:
        raise NotImplementedError

    def funnel(self) -> list[dict]:
        rows: list[dict] = []
        outcomes = self.outcomes()
        for i, (stage, outcome, reason, count) in enumerate(outcomes):
            rows.append({"stage": stage, "outcome": outcome, "reason": reason, "count": count})
            if i + 1 == len(outcomes) or outcomes[i + 1][0] != stage:
                rows += failed_shard_rows(stage, self.failed, self.failed_rows)
        return rows
