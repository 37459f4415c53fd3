"""Lineage after selection: which shards are selected, and what each stage's output was made from.

select writes, per shard, a digest of its decisions (`select/{shard}.done` -> "decisions") and, for
the whole run, a fingerprint (reports/thresholds.json -> "fingerprint"). Caption and tokenize key
each shard's output on the shard's decisions digest and their own settings, so a re-selection redoes
exactly the shards whose kept samples changed, and every marker carries the selection it belongs to.
"""
from __future__ import annotations

import hashlib

from tessera.core.store import ShardStore

SELECT = "select"


def input_shards(store: ShardStore) -> list[str]:
    """Shards whose selection is final (and whose download is there)."""
    downloaded = set(store.done_shards("download"))
    return [s for s in store.done_shards(SELECT) if s in downloaded]


def kept_counts(store: ShardStore, shards) -> int:
    """Kept samples over these shards (the rows a later stage owes them)."""
    markers = store.markers(SELECT)
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
    selected = store.markers(SELECT)
    above = [store.markers(stage) for stage in upstream]
    out = {}
    for shard in shards:
        parts = [selected[shard]["decisions"], stage_lineage]
        parts += [m[shard].get("fingerprint", "") if shard in m else "-" for m in above]
        out[shard] = hashlib.sha256(":".join(parts).encode()).hexdigest()[:16]
    return out


def check_one_selection(store: ShardStore, folder: str, shards: list[str]) -> str | None:
    """The one selection every shard of an output folder belongs to; an error naming the shards
    when they come from different selections (a re-selection whose outputs were not all redone)."""
    markers = store.markers(folder)
    groups: dict[str | None, list[str]] = {}
    for shard in shards:
        groups.setdefault(markers[shard].get("selection"), []).append(shard)
    if len(groups) > 1:
        listed = "; ".join(f"{sel or 'no selection recorded'}: {', '.join(s[:5])}{' ...' if len(s) > 5 else ''}"
                           for sel, s in groups.items())
        raise ValueError(f"{store.url(folder)} mixes shards of {len(groups)} different selections ({listed}); "
                         "run the curate flow again so that every shard belongs to the current selection")
    return next(iter(groups), None)
