"""The select stage's per-shard work: each function reads one shard's scores, computes, and returns a
small summary (sketches, counts, a bounded number of boundary rows), or writes the shard's decisions.
They run as Ray tasks; the driver (select.py) only merges what they return.
"""
from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from tessera.config.filters import FiltersConfig
from tessera.core import quantiles
from tessera.core.lineage import DECISION_COLUMNS, selection_summary, with_decisions, write_decisions
from tessera.core.store import ShardStore
from tessera.filters import BELOW_TARGET, ThresholdFilter, build_filters
from tessera.filters.dedup import ExactDuplicateFilter, NearDuplicateFilter
from tessera.pipelines import exchange, score, semdedup

STAGE = "select"
# The compact scores files of a selection in progress (removed when its decisions are written).
COMPACT = f"{STAGE}/_compact"
TEXT_COLUMNS = ("url", "caption", "sha256")

# Score columns with a histogram, and their titles.
HISTOGRAMS = {
    "clip_score": "CLIP image-text score", "aesthetic": "Aesthetic score", "pwatermark": "Watermark probability",
    "punsafe": "NSFW probability", "short_side": "Original short side (px)", "aspect_ratio": "Aspect ratio",
    "caption_words": "Caption words", "caption_letter_fraction": "Caption letter fraction",
}


@dataclass
class Plan:
    """What every per-shard decision needs; grows as the driver settles each step."""

    cfg: FiltersConfig
    sources: dict
    thresholds: dict[str, float | None] = field(default_factory=dict)  # per threshold filter
    dedup_done: bool = False                # duplicate_of can be read from the dedup files
    dedup_tasks: int = 0                    # the dedup passes' shard tasks (semdedup.task_of)
    boundary: tuple[float, str] | None = None  # the last kept (badness, key) of the target
    target_empty: bool = False              # the target keeps nothing

    @property
    def rank_by(self) -> tuple[str, bool]:
        column = self.cfg.target.rank_by
        return column, column in ("clip_score", "aesthetic")

    def filters(self) -> list:
        filters = build_filters(self.cfg, self.sources)
        for f in filters:
            if isinstance(f, ThresholdFilter) and f.name in self.thresholds:
                f.threshold = self.thresholds[f.name]
        return filters


def badness(values: np.ndarray, higher: bool) -> np.ndarray:
    """Scores as ranks ascend: best first, a missing score last (+inf)."""
    b = -values if higher else values.copy()
    b[np.isnan(b)] = np.inf
    return b


def scores_table(store: ShardStore, shard: str, decisions: bool = False, columns: list[str] | None = None) -> pa.Table:
    """One shard's scores without the text columns (sha256 kept; with select's last decisions,
    from select/{shard}.parquet, when asked): a full read of the scores shard, or of its key, error
    and `columns` only, when given."""
    unwanted = {c for c in TEXT_COLUMNS if c != "sha256"} | set(DECISION_COLUMNS)
    with store.fs.open(store.path(score.SCORES, f"{shard}.parquet"), "rb") as f:
        names = pq.read_schema(f).names
    wanted = None if columns is None else {"key", "error", *columns}
    # Column projection: the text columns are most of a shard's bytes and are never read here.
    table = store.read_table(score.SCORES, f"{shard}.parquet",
                             columns=[c for c in names if c not in unwanted and (wanted is None or c in wanted)])
    return with_decisions(store, shard, table) if decisions else table


def to_frame(table: pa.Table, hashes: bool = False) -> pd.DataFrame:
    if not hashes and "sha256" in table.column_names:
        table = table.drop_columns(["sha256"])
    frame = table.to_pandas()
    if "error" not in frame:
        frame["error"] = ""
    frame["error"] = frame["error"].fillna("")
    frame["key"] = frame["key"].astype(object)
    return frame


def read_frame(store: ShardStore, shard: str, decisions: bool = False, hashes: bool = False,
               columns: list[str] | None = None) -> pd.DataFrame:
    """One shard's scores from the scores parquet (see scores_table)."""
    return to_frame(scores_table(store, shard, decisions, columns), hashes)


def write_compact(store: ShardStore, shard: str, table: pa.Table) -> None:
    """The shard's compact scores file: the columns select's passes read (key, scores, sha256),
    row i beside row i of embeddings/{shard}.npy, as lz4-compressed Arrow."""
    with store.open_atomic(COMPACT, f"{shard}.arrow") as f:
        with pa.ipc.new_file(f, table.schema, options=pa.ipc.IpcWriteOptions(compression="lz4")) as writer:
            writer.write_table(table)


def compact_frame(store: ShardStore, shard: str, hashes: bool = False) -> pd.DataFrame:
    """One shard's scores from its compact file (written by the first pass, `stats`)."""
    with store.fs.open(store.path(COMPACT, f"{shard}.arrow"), "rb") as f:
        table = pa.ipc.open_file(pa.BufferReader(f.read())).read_all()
    return to_frame(table, hashes)


def reasons(frame: pd.DataFrame, plan: Plan, dups: tuple[np.ndarray, np.ndarray] | None = None) -> np.ndarray:
    """The reason per row ("" when kept) after every filter the plan has settled so far, in ORDER:
    the first failing filter names it. Exact copies and near-duplicates count when `dups`
    (exact_of, near_of) is given; the target applies once its boundary is settled."""
    out = np.full(len(frame), "", dtype=object)
    exact_of, near_of = dups if dups is not None else ("", "")
    frame["exact_duplicate_of"] = exact_of
    frame["duplicate_of"] = near_of
    for f in plan.filters():
        if isinstance(f, (ExactDuplicateFilter, NearDuplicateFilter)) and dups is None:
            continue
        fresh = f.decide(frame)
        out = np.where(out == "", fresh, out)
    if plan.target_empty:
        out[out == ""] = BELOW_TARGET
    elif plan.boundary is not None:
        column, higher = plan.rank_by
        b = badness(frame[column].to_numpy(dtype=np.float64), higher)
        v, key = plan.boundary
        keys = frame["key"].to_numpy(dtype=object)
        inside = (b < v) | ((b == v) & (keys <= key))
        out[(out == "") & ~inside] = BELOW_TARGET
    return out


def decided(store: ShardStore, shard: str, plan: Plan) -> tuple[pd.DataFrame, np.ndarray]:
    """The shard's frame (with exact_duplicate_of and duplicate_of) and its reasons under the plan."""
    frame = compact_frame(store, shard)
    dups = None
    if plan.dedup_done:
        dups = semdedup.duplicates(store, shard, frame["key"].to_numpy(dtype=object), plan.dedup_tasks)
    return frame, reasons(frame, plan, dups)


def duplicate_of(frame: pd.DataFrame) -> np.ndarray:
    """The key each row is a copy or a near-duplicate of ("" for neither)."""
    exact = frame["exact_duplicate_of"].to_numpy(dtype=object)
    return np.where(exact != "", exact, frame["duplicate_of"].to_numpy(dtype=object)).astype(object)


# Dedup: one task per group of shards (semdedup.py) -------------------------------------------------
def survivors(store: ShardStore, shard: str, plan: Plan, hashes: bool = False) -> tuple[pd.DataFrame, np.ndarray]:
    """The shard's frame and the rows that pass every filter before the duplicate filters."""
    frame = compact_frame(store, shard, hashes=hashes)
    return frame, np.flatnonzero(reasons(frame, plan) == "")


def dedup_scan(store: ShardStore, task: str, plan: Plan, shards: list[str], partitions: int, quota: int,
               exact: bool) -> dict:
    """Send the survivors' content hashes to their partitions (exact pass) and return their count
    and a deterministic sample of their embeddings (for the k-means; none when quota is 0)."""
    keys, hashes, sids, samples = [], [], [], []
    count = 0
    for shard in shards:
        frame, alive = survivors(store, shard, plan, hashes=True)
        count += len(alive)
        if not len(alive):
            continue
        k = frame["key"].to_numpy(dtype=object)[alive]
        if exact and "sha256" in frame:
            keys.append(k)
            hashes.append(frame["sha256"].to_numpy(dtype=object)[alive])
            sids.append(np.full(len(alive), semdedup.shard_id(shard), np.int64))
        if quota:
            samples.append(semdedup.read_embeddings(store, shard)[alive[semdedup.sample_rows(k, quota)]])
    files = 0
    if keys:
        files = semdedup.send_hashes(store, task, np.concatenate(keys), np.concatenate(hashes),
                                     np.concatenate(sids), partitions)
    return {"survivors": count, "files_written": files, "sample": np.concatenate(samples) if samples else None,
            "task_peak_mb": semdedup.peak_mb()}


def dedup_assign(store: ShardStore, task: str, plan: Plan, shards: list[str], centroids: np.ndarray,
                 spill_margin: float, partitions: int) -> dict:
    """Send the survivors that are not exact copies to their clusters' partitions."""
    copies = exchange.receive(store, semdedup.EXACT_OUT, [semdedup.name(p) for p in range(partitions)], int(task))
    copied = np.asarray(copies.column("key").to_pylist() if copies is not None else [], dtype=str)
    keys, sids, embs = [], [], []
    for shard in shards:
        frame, alive = survivors(store, shard, plan)
        k = frame["key"].to_numpy(dtype=object)[alive]
        searched = ~np.isin(k.astype(str), copied)
        if not searched.any():
            continue
        keys.append(k[searched])
        sids.append(np.full(int(searched.sum()), semdedup.shard_id(shard), np.int64))
        embs.append(semdedup.read_embeddings(store, shard)[alive[searched]])
    if not keys:
        return {"assigned": 0, "spilled": 0, "files_written": 0}
    return semdedup.send_embeddings(store, task, np.concatenate(keys), np.concatenate(sids), np.concatenate(embs),
                                    centroids, spill_margin, partitions)


def dedup_tasks(shards: list[str], shards_per_task: int) -> dict[str, list[str]]:
    """The dedup passes' tasks: name -> its shards (a shard's task is semdedup.task_of)."""
    tasks = max(1, math.ceil(len(shards) / shards_per_task))
    groups: dict[str, list[str]] = {}
    for shard in shards:
        groups.setdefault(semdedup.name(semdedup.task_of(shard, tasks)), []).append(shard)
    return dict(sorted(groups.items()))


# Pass 1 --------------------------------------------------------------------------------------------
def stats(store: ShardStore, shard: str, sketched: dict[str, tuple[str, bool]], ranged: list[str], k: int) -> dict:
    """Rows; a sketch of each keep_fraction score over the readable rows (as badness); the range of
    each histogram column; the score columns present. Writes the shard's compact scores file,
    which every later pass reads instead of the scores shard."""
    table = scores_table(store, shard)
    write_compact(store, shard, table)
    frame = to_frame(table)
    readable = (frame["error"] == "").to_numpy()
    out = {"rows": len(frame), "columns": sorted(frame.columns), "sketches": {}, "ranges": {}}
    for name, (column, higher) in sketched.items():
        if column in frame:
            out["sketches"][name] = quantiles.sketch(badness(frame[column].to_numpy(np.float64)[readable], higher), k)
    for column in ranged:
        if column in frame:
            v = frame[column].to_numpy(dtype=np.float64)
            v = v[~np.isnan(v)]
            if len(v):
                out["ranges"][column] = (float(v.min()), float(v.max()))
    return out


# Boundaries: a window query per problem ----------------------------------------------------------
def window(store: ShardStore, shard: str, plan: Plan, problems: dict[str, dict], k: int) -> dict:
    """Answer each problem's window query on this shard. A problem names its column, direction and
    rows: `readable` (a keep_fraction threshold) or `survivors` (the target, after every filter)."""
    if any(p["rows"] == "survivors" for p in problems.values()):
        frame, why = decided(store, shard, plan)
        alive = why == ""
    else:
        frame = compact_frame(store, shard)
    readable = (frame["error"] == "").to_numpy()
    keys = frame["key"].to_numpy(dtype=object)
    out = {}
    for name, p in problems.items():
        b = badness(frame[p["column"]].to_numpy(dtype=np.float64), p["higher"])
        if p["rows"] == "readable":
            rows = readable & np.isfinite(b)
        else:
            rows = alive
        out[name] = quantiles.in_window(b[rows], keys[rows], p["lo"], p["hi"], k, p["gather"])
    return out


def ranked(store: ShardStore, shard: str, plan: Plan, k: int) -> dict:
    """The survivors of every filter: how many, and a sketch of their rank_by score (as badness)."""
    frame, why = decided(store, shard, plan)
    alive = why == ""
    column, higher = plan.rank_by
    b = badness(frame[column].to_numpy(dtype=np.float64)[alive], higher) if column in frame else np.zeros(0)
    return {"survivors": int(alive.sum()), "finite": int(np.isfinite(b).sum()), "sketch": quantiles.sketch(b, k)}


# The last pass: decisions, histograms ------------------------------------------------------------
def apply(store: ShardStore, shard: str, plan: Plan, edges: dict[str, list[float]]) -> dict:
    """Decide and write the decisions into the shard's scores; return its counts, a digest of its
    decisions (its lineage for caption and tokenize) and its kept/dropped histogram over the bin edges."""
    frame, why = decided(store, shard, plan)
    keys = frame["key"].to_numpy(dtype=object)
    dup = duplicate_of(frame)
    write_decisions(store, shard, keys, why == "", why, dup)
    kept = why == ""
    hist = {}
    for column, e in edges.items():
        if column in frame:
            v = frame[column].to_numpy(dtype=np.float64)
            ok = ~np.isnan(v)
            hist[column] = [np.histogram(v[ok & kept], e)[0].tolist(), np.histogram(v[ok & ~kept], e)[0].tolist()]
    return {**selection_summary(keys, kept, why, dup), "rows_in": int(len(keys)),
            "reasons": dict(Counter(r for r in why if r)), "hist": hist}


def histogram_marks(summary: dict) -> dict[str, list[tuple[float, str]]]:
    """The thresholds to draw on each histogram column, as (value, label)."""
    marks: dict[str, list] = {}
    for name, desc in summary["filters"].items():
        if desc.get("threshold") is not None:
            marks.setdefault(desc["score"], []).append((desc["threshold"], "threshold"))
    if summary["filters"].get("size"):
        marks.setdefault("short_side", []).append((summary["filters"]["size"]["min_side"], "min"))
        marks.setdefault("aspect_ratio", []).append((summary["filters"]["size"]["max_aspect_ratio"], "max"))
    if summary["filters"].get("caption"):
        marks.setdefault("caption_words", []).append((summary["filters"]["caption"]["min_words"], "min"))
        marks.setdefault("caption_letter_fraction", []).append(
            (summary["filters"]["caption"]["min_letter_fraction"], "min"))
    target = summary.get("target") or {}
    if target.get("threshold") is not None and not np.isnan(target["threshold"]):
        marks.setdefault(target["rank_by"], []).append((target["threshold"], "target"))
    return marks
