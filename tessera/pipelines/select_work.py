"""The select stage's per-shard work: each function reads one shard's scores, computes, and returns a
small summary (sketches, counts, a bounded number of boundary rows), or writes the shard's decisions.
They run as Ray tasks; the driver (select.py) only merges what they return.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import pyarrow as pa

from tessera.config.filters import FiltersConfig
from tessera.core import quantiles
from tessera.core.lineage import selection_summary
from tessera.core.store import ShardStore
from tessera.filters import BELOW_TARGET, ThresholdFilter, build_filters
from tessera.filters.dedup import NearDuplicateFilter
from tessera.pipelines import score

STAGE = "select"
DECISION_COLUMNS = ("keep", "reason", "duplicate_of")
TEXT_COLUMNS = ("url", "caption", "sha256")


@dataclass
class Plan:
    """What every per-shard decision needs; grows as the driver settles each step."""

    cfg: FiltersConfig
    sources: dict
    thresholds: dict[str, float | None] = field(default_factory=dict)  # per threshold filter
    dedup_done: bool = False                # duplicate_of can be read from the dedup files
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


def read_frame(store: ShardStore, shard: str, decisions: bool = False) -> pd.DataFrame:
    """One shard's scores without the text columns (and without the last decisions unless asked)."""
    table = store.read_table(score.SCORES, f"{shard}.parquet")
    unwanted = list(TEXT_COLUMNS) + ([] if decisions else list(DECISION_COLUMNS))
    frame = table.drop_columns([c for c in unwanted if c in table.column_names]).to_pandas()
    if "error" not in frame:
        frame["error"] = ""
    frame["error"] = frame["error"].fillna("")
    frame["key"] = frame["key"].astype(object)
    return frame


def reasons(frame: pd.DataFrame, plan: Plan, duplicate_of: np.ndarray | None = None) -> np.ndarray:
    """The reason per row ("" when kept) after every filter the plan has settled so far, in ORDER:
    the first failing filter names it. Near-duplicates count when `duplicate_of` is given; the
    target applies once its boundary is settled."""
    out = np.full(len(frame), "", dtype=object)
    frame["duplicate_of"] = duplicate_of if duplicate_of is not None else ""
    for f in plan.filters():
        if isinstance(f, NearDuplicateFilter) and duplicate_of is None:
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
    """The shard's frame (with duplicate_of) and its reasons under the plan."""
    from tessera.pipelines import semdedup

    frame = read_frame(store, shard)
    dup = semdedup.duplicates(store, shard, frame["key"].to_numpy(dtype=object)) if plan.dedup_done else None
    return frame, reasons(frame, plan, dup)


# Pass 1 --------------------------------------------------------------------------------------------
def stats(store: ShardStore, shard: str, sketched: dict[str, tuple[str, bool]], ranged: list[str], k: int) -> dict:
    """Rows; a sketch of each keep_fraction score over the readable rows (as badness); the range of
    each histogram column; the score columns present."""
    frame = read_frame(store, shard)
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
        frame = read_frame(store, shard)
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
def write_decisions(store: ShardStore, shard: str, keys: np.ndarray, why: np.ndarray, duplicate_of: np.ndarray) -> None:
    """Replace keep, reason and duplicate_of in scores/{shard}.parquet with this selection's."""
    table = store.read_table(score.SCORES, f"{shard}.parquet")
    table = table.drop_columns([c for c in DECISION_COLUMNS if c in table.column_names])
    if table.column("key").to_pylist() != list(keys):
        raise RuntimeError(f"scores/{shard}.parquet changed while selecting; run select again")
    table = table.append_column("keep", pa.array(why == "", pa.bool_()))
    table = table.append_column("reason", pa.array([str(r) for r in why], pa.string()))
    table = table.append_column("duplicate_of", pa.array([str(d) for d in duplicate_of], pa.string()))
    store.write_table(table, score.SCORES, f"{shard}.parquet")


def apply(store: ShardStore, shard: str, plan: Plan, edges: dict[str, list[float]]) -> dict:
    """Decide and write the decisions into the shard's scores; return its counts, a digest of its
    decisions (its lineage for caption and tokenize) and its kept/dropped histogram over the bin edges."""
    frame, why = decided(store, shard, plan)
    keys = frame["key"].to_numpy(dtype=object)
    duplicate_of = frame["duplicate_of"].to_numpy(dtype=object)
    write_decisions(store, shard, keys, why, duplicate_of)
    kept = why == ""
    hist = {}
    for column, e in edges.items():
        if column in frame:
            v = frame[column].to_numpy(dtype=np.float64)
            ok = ~np.isnan(v)
            hist[column] = [np.histogram(v[ok & kept], e)[0].tolist(), np.histogram(v[ok & ~kept], e)[0].tolist()]
    return {**selection_summary(keys, kept, why, duplicate_of), "rows_in": int(len(keys)),
            "reasons": dict(Counter(r for r in why if r)), "hist": hist}
