"""Lineage after selection: which shards are selected, and what each stage's output was made from.

select's decisions live in select's own files, `select/{shard}.parquet` (key, keep, reason,
duplicate_of, in the order of the shard's scores), never inside another stage's output: a score
shard redone does not erase them, and `with_decisions` joins them to any table of the shard's
samples. A decisions file whose keys are not the scores' (scores redone with other samples, and
select not run since) is an error that says to run select again.

select writes, per shard, a digest of its decisions (`select/{shard}.done` -> "decisions") and, for
the whole run, a fingerprint (reports/thresholds.json -> "fingerprint"). Caption and tokenize key
each shard's output on the shard's decisions digest and their own settings, so a re-selection redoes
exactly the shards whose kept samples changed, and every marker carries the selection it belongs to.
"""
from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING

from tessera.core.store import MARKER_BATCH, ShardStore

if TYPE_CHECKING:
    import pyarrow as pa

SELECT = "select"
DECISION_COLUMNS = ("keep", "reason", "duplicate_of")


def write_decisions(store: ShardStore, shard: str, keys, keep, reasons, duplicate_of) -> None:
    """select/{shard}.parquet: one row per scored sample, in the scores' order."""
    import pyarrow as pa  # the training loader reads lineage without pyarrow (the GPU kit has none)

    store.write_table(pa.table({
        "key": pa.array([str(k) for k in keys], pa.string()),
        "keep": pa.array([bool(k) for k in keep], pa.bool_()),
        "reason": pa.array([str(r) for r in reasons], pa.string()),
        "duplicate_of": pa.array([str(d) for d in duplicate_of], pa.string()),
    }), SELECT, f"{shard}.parquet")


def read_decisions(store: ShardStore, shard: str) -> pa.Table:
    return store.read_table(SELECT, f"{shard}.parquet")


def with_decisions(store: ShardStore, shard: str, table: pa.Table) -> pa.Table:
    """`table` (one shard's samples, with a `key` column, in the scores' order) with select's keep,
    reason and duplicate_of appended (replacing any of those columns it had)."""
    decisions = read_decisions(store, shard)
    if table.column("key").to_pylist() != decisions.column("key").to_pylist():
        raise ValueError(f"{store.url(SELECT, shard + '.parquet')} decides other samples than the shard's scores "
                         "(the shard was scored again since): run select again")
    table = table.drop_columns([c for c in DECISION_COLUMNS if c in table.column_names])
    for column in DECISION_COLUMNS:
        table = table.append_column(column, decisions.column(column))
    return table


def input_shards(store: ShardStore) -> list[str]:
    """Shards whose selection is final (and whose download is there)."""
    downloaded = set(store.done_shards("download"))
    return [s for s in store.done_shards(SELECT) if s in downloaded]


def kept_counts(store: ShardStore, shards) -> int:
    """Kept samples over these shards (the rows a later stage owes them)."""
    markers = store.markers(SELECT, fields=("kept",))
    return sum(int(markers[s]["kept"]) for s in shards)


def selection_id(store: ShardStore) -> str:
    """The fingerprint of the current selection (thresholds, config, score inputs)."""
    return store.read_json("reports", "thresholds.json")["fingerprint"]


def selection_summary(keys, keep, reasons, duplicate_of) -> dict:
    """A shard's select marker: its counts and a digest of what was decided, sample by sample."""
    h = hashlib.sha256()
    kept = 0
    for key, k, reason, dup in zip(keys, keep, reasons, duplicate_of):
        kept += bool(k)
        h.update(f"{key}\x1f{bool(k)}\x1f{reason}\x1f{dup}\x1e".encode())
    return {"kept": kept, "dropped": len(keys) - kept, "decisions": h.hexdigest()[:16]}


def shard_fingerprints(store: ShardStore, shards: list[str], stage_lineage: str,
                       upstream: tuple[str, ...] = ()) -> dict[str, str]:
    """Per shard: its selection's decisions, the fingerprints of its markers in `upstream` stages
    (absent counts as absent), and this stage's own settings."""
    out = {}
    for i in range(0, len(shards), MARKER_BATCH):  # the driver holds one batch of markers at a time
        batch = shards[i:i + MARKER_BATCH]
        selected = store.read_markers(SELECT, batch, fields=("decisions",))
        above = [store.read_markers(stage, batch, fields=("fingerprint",)) for stage in upstream]
        for shard in batch:
            if shard not in selected:
                raise ValueError(f"{store.url(*store.marker(SELECT, shard))}: no readable selection marker; "
                                 "run select again")
            parts = [selected[shard]["decisions"], stage_lineage]
            parts += [m[shard].get("fingerprint", "") if shard in m else "-" for m in above]
            out[shard] = hashlib.sha256(":".join(parts).encode()).hexdigest()[:16]
    return out


def check_one_selection(store: ShardStore, folder: str, shards: list[str]) -> str | None:
    """The one selection every shard of an output folder belongs to; an error naming the shards
    when they come from different selections (a re-selection whose outputs were not all redone)."""
    markers = store.markers(folder, fields=("selection",))
    groups: dict[str | None, list[str]] = {}
    for shard in shards:
        groups.setdefault(markers[shard].get("selection"), []).append(shard)
    if len(groups) > 1:
        listed = "; ".join(f"{sel or 'no selection recorded'}: {', '.join(s[:5])}{' ...' if len(s) > 5 else ''}"
                           for sel, s in groups.items())
        raise ValueError(f"{store.url(folder)} mixes shards of {len(groups)} different selections ({listed}); "
                         "run the curate flow again so that every shard belongs to the current selection")
    return next(iter(groups), None)
