"""The exact in-memory selection: every score row of every shard in one process.

This was the select stage before it was distributed. It stays as the reference that the
distributed select is tested against (and measured against in bench/scale.py), for data that fits
in one machine's memory. It decides; it writes nothing.
"""
from __future__ import annotations

import io
import logging
from collections import Counter

import numpy as np
import pandas as pd

from tessera.config.filters import FiltersConfig
from tessera.core.lineage import DECISION_COLUMNS, with_decisions
from tessera.core.store import ShardStore
from tessera.filters import BELOW_TARGET, ThresholdFilter, build_filters, score_configs
from tessera.filters.dedup import ExactDuplicateFilter, NearDuplicateFilter, exact_duplicate_of
from tessera.pipelines import score

log = logging.getLogger(__name__)
TEXT_COLUMNS = ("url", "caption")


def load_scores(store: ShardStore, shards: list[str], decisions: bool = False, text: bool = True) -> pd.DataFrame:
    """Every scored sample, in shard then key order, with a `shard` column (and the last
    selection's keep, reason and duplicate_of with `decisions`). `text=False` leaves out the url
    and caption columns, which no decision reads and which take most of the memory."""
    unwanted = list(DECISION_COLUMNS) + ([] if text else list(TEXT_COLUMNS))
    frames = []
    for shard in shards:
        table = store.read_table(score.SCORES, f"{shard}.parquet")
        table = table.drop_columns([c for c in unwanted if c in table.column_names])
        frame = (with_decisions(store, shard, table) if decisions else table).to_pandas()
        frame.insert(0, "shard", shard)
        frames.append(frame)
    frame = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    for col in ("key", "error"):
        if col not in frame:
            frame[col] = pd.Series([], dtype=object) if frame.empty else ""
    frame["error"] = frame["error"].fillna("")
    return frame


def load_embeddings(store: ShardStore, shards: list[str], rows: dict[str, int]) -> np.ndarray | None:
    parts = []
    for shard in shards:
        if not rows[shard]:
            continue
        if not store.exists(score.EMBEDDINGS, f"{shard}.npy"):
            return None
        with store.fs.open(store.path(score.EMBEDDINGS, f"{shard}.npy"), "rb") as f:
            parts.append(np.load(io.BytesIO(f.read())))
    return np.concatenate(parts).astype(np.float32) if parts else np.zeros((0, 1), np.float32)


def choose_thresholds(cfg: FiltersConfig, filters: list, frame: pd.DataFrame) -> dict:
    """Set each score filter's threshold (absolute, or from its distribution); describe them all."""
    subs = score_configs(cfg)
    readable = frame["error"] == ""
    described = {}
    for f in filters:
        if isinstance(f, ThresholdFilter):
            sub = subs[f.name]
            mode = "absolute" if f.threshold is not None else "none"
            if sub.keep_fraction is not None:
                values = frame.loc[readable, f.column].to_numpy(dtype=np.float64)
                mode = f"keep_fraction {sub.keep_fraction}"
                if np.isnan(values).all():
                    mode += " (no valid scores)"
                else:
                    f.threshold = f.threshold_for_fraction(values, sub.keep_fraction)
            described[f.name] = {**f.describe(), "mode": mode}
        else:
            described[f.name] = f.describe()
    return described


def decide(cfg: FiltersConfig, filters: list, frame: pd.DataFrame, embeddings: np.ndarray | None) -> tuple[np.ndarray, dict]:
    """The reason per sample ("" when kept), and what the target step chose."""
    reasons = np.full(len(frame), "", dtype=object)
    frame["duplicate_of"] = ""
    frame["exact_duplicate_of"] = ""
    for f in filters:
        if isinstance(f, ExactDuplicateFilter) and "sha256" in frame:
            alive = np.flatnonzero(reasons == "")
            exact = np.full(len(frame), "", dtype=object)
            exact[alive] = exact_duplicate_of(frame["key"].to_numpy(dtype=object)[alive],
                                              frame["sha256"].to_numpy(dtype=object)[alive])
            frame["exact_duplicate_of"] = exact
        if isinstance(f, NearDuplicateFilter):
            alive = np.flatnonzero(reasons == "")  # exact copies already have their reason
            dup = np.full(len(frame), "", dtype=object)
            dup[alive] = f.duplicate_of(frame["key"].to_numpy(dtype=object)[alive].tolist(), embeddings[alive])
            frame["duplicate_of"] = dup
        fresh = f.decide(frame)
        reasons = np.where(reasons == "", fresh, reasons)
    target = {}
    t = cfg.target
    if t.count is not None or t.fraction is not None:
        want = t.count if t.count is not None else int(round(t.fraction * len(frame)))
        column = t.rank_by
        alive = np.flatnonzero(reasons == "")
        higher = t.rank_by in ("clip_score", "aesthetic")
        values = frame[column].to_numpy(dtype=np.float64)[alive]
        keys = frame["key"].to_numpy(dtype=object)[alive]
        # lexsort: last key is primary. Best score first, then lowest key.
        ranked = alive[np.lexsort((keys, -values if higher else values))]
        reasons[ranked[want:]] = BELOW_TARGET
        kept = ranked[:want]
        target = {"requested": want, "rank_by": column, "kept": int(len(kept)),
                  "threshold": float(frame[column].iloc[kept[-1]]) if len(kept) else None,
                  "keep_if": ">=" if higher else "<="}
        if len(kept) < want:
            target["shortfall"] = int(want - len(kept))
    return reasons, target


def exact_reference(cfg: FiltersConfig, store: ShardStore, shards: list[str] | None = None) -> tuple[pd.DataFrame, dict]:
    """Decide over every scored shard in memory. Returns one row per sample (shard, key, keep,
    reason, duplicate_of) in shard then key order, and {samples, kept, dropped, filters, target}."""
    shards = shards if shards is not None else store.done_shards(score.STAGE)
    frame = load_scores(store, shards, text=False)
    sources = store.done_info(score.STAGE, shards[-1])["sources"]
    filters = build_filters(cfg, sources)
    thresholds = choose_thresholds(cfg, filters, frame)
    rows = Counter(frame["shard"])
    embeddings = load_embeddings(store, shards, rows) if cfg.dedup.enabled else None
    reasons, target = decide(cfg, filters, frame, embeddings)
    exact = frame["exact_duplicate_of"].to_numpy(dtype=object)
    dup = np.where(exact != "", exact, frame["duplicate_of"].to_numpy(dtype=object))
    out = pd.DataFrame({"shard": frame["shard"], "key": frame["key"], "keep": reasons == "",
                        "reason": reasons, "duplicate_of": dup})
    dropped = Counter(r for r in reasons if r)
    summary = {"samples": int(len(frame)), "kept": int(out["keep"].sum()), "dropped": dict(sorted(dropped.items())),
               "filters": thresholds, "target": target}
    return out, summary
