"""The select stage: scores -> keep, or drop with one reason, for every scored sample.

1. Thresholds: absolute (`min`/`max`) or chosen from the score's distribution (`keep_fraction`).
2. Each filter in ORDER decides; a sample is dropped for the first filter it fails.
3. Near-duplicates among the survivors, over all shards at once (lowest key kept per group).
4. `target`: the survivors ranked by one score (ties by key), exactly `count` kept.
5. keep, reason and duplicate_of are written into scores/{shard}.parquet, then select/{shard}.done,
   then reports/thresholds.json (the run's thresholds, counts and a fingerprint of its inputs).

Selection is global (distributions, duplicates and the target span every shard), so it is redone
as a whole whenever the scored shards or the config change, and skipped when neither did.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import pyarrow as pa

from tessera.config.score import FiltersConfig
from tessera.filters import BELOW_TARGET, ORDER, ThresholdFilter, build_filters, score_configs
from tessera.filters.dedup import NearDuplicateFilter
from tessera.pipelines import score
from tessera.pipelines.lineage import selection_summary
from tessera.pipelines.store import ShardStore

log = logging.getLogger(__name__)
STAGE = "select"
KEPT = "kept"
DECISION_COLUMNS = ("keep", "reason", "duplicate_of")
TEXT_COLUMNS = ("url", "caption", "sha256")


@dataclass
class SelectResult:
    samples: int
    kept: int
    dropped: dict[str, int]
    thresholds: dict
    failed: dict[str, str] = field(default_factory=dict)

    def funnel(self) -> list[dict]:
        rows = [{"stage": STAGE, "outcome": KEPT, "reason": "", "count": self.kept}]
        rows += [{"stage": STAGE, "outcome": "dropped", "reason": r, "count": n}
                 for r, n in sorted(self.dropped.items())]
        return rows


def load_scores(store: ShardStore, shards: list[str], decisions: bool = False, text: bool = True) -> pd.DataFrame:
    """Every scored sample, in shard then key order, with a `shard` column (and the last
    selection's keep, reason and duplicate_of with `decisions`). `text=False` leaves out the url,
    caption and sha256 columns, which no decision reads and which take most of the memory."""
    unwanted = ([] if decisions else list(DECISION_COLUMNS)) + ([] if text else list(TEXT_COLUMNS))
    frames = []
    for shard in shards:
        table = store.read_table(score.SCORES, f"{shard}.parquet")
        frame = table.drop_columns([c for c in unwanted if c in table.column_names]).to_pandas()
        frame.insert(0, "shard", shard)
        frames.append(frame)
    frame = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    for col in ("key", "error"):
        if col not in frame:
            frame[col] = pd.Series([], dtype=object) if frame.empty else ""
    frame["error"] = frame["error"].fillna("")
    return frame


def write_decisions(store: ShardStore, shard: str, part: pd.DataFrame) -> None:
    """Replace keep, reason and duplicate_of in scores/{shard}.parquet with this selection's."""
    table = store.read_table(score.SCORES, f"{shard}.parquet")
    table = table.drop_columns([c for c in DECISION_COLUMNS if c in table.column_names])
    if table.column("key").to_pylist() != part["key"].tolist():
        raise RuntimeError(f"scores/{shard}.parquet changed while selecting; run select again")
    table = table.append_column("keep", pa.array(part["keep"].to_numpy(dtype=bool), pa.bool_()))
    for col in ("reason", "duplicate_of"):
        table = table.append_column(col, pa.array(part[col].astype(str).tolist(), pa.string()))
    store.write_table(table, score.SCORES, f"{shard}.parquet")


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
            if f.column not in frame:
                raise ValueError(f"the scores have no {f.column!r} column: filters.{f.name} was enabled after "
                                 f"scoring; remove the score/ markers to score again")
            sub = subs[f.name]
            mode = "absolute" if f.threshold is not None else "none"
            if sub.keep_fraction is not None:
                values = frame.loc[readable, f.column].to_numpy(dtype=np.float64)
                mode = f"keep_fraction {sub.keep_fraction}"
                if np.isnan(values).all():  # every sample is dropped as <score>_missing anyway
                    log.warning("%s: no valid scores to choose a keep_fraction threshold from.", f.column)
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
    for f in filters:
        if isinstance(f, NearDuplicateFilter):
            if embeddings is None:
                raise ValueError("near-duplicate search needs the image embeddings, which were not stored "
                                 "(filters.dedup was enabled after scoring; remove the score/ markers to score again)")
            alive = np.flatnonzero(reasons == "")
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
        if column not in frame:
            raise ValueError(f"filters.target.rank_by: the scores have no {column!r} (is filters.{t.rank_by} off?)")
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
            log.warning("Only %d samples pass every filter; the target was %d.", len(kept), want)
    return reasons, target


def fingerprint(cfg: FiltersConfig, store: ShardStore, shards: list[str]) -> str:
    infos = [store.done_info(score.STAGE, s) for s in shards]
    blob = json.dumps({"cfg": cfg.model_dump(mode="json"), "shards": shards, "infos": infos}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def run(cfg: FiltersConfig, store: ShardStore, on_shard=None) -> SelectResult:
    """Select over every scored shard; skipped when nothing changed since the last selection."""
    shards = store.done_shards(score.STAGE)
    if not shards:
        raise ValueError(f"{store.root}: no scored shards to select from (run the score stage first)")
    missing = sorted(set(store.done_shards("download")) - set(shards))
    if missing:
        log.warning("Selecting over %d scored shards; %d downloaded shards are not scored yet (%s...).",
                    len(shards), len(missing), ", ".join(missing[:3]))
    stamp = fingerprint(cfg, store, shards)
    if store.exists("reports", "thresholds.json") and all(store.is_done(STAGE, s) for s in shards):
        previous = store.read_json("reports", "thresholds.json")
        if previous.get("fingerprint") == stamp:
            log.info("Select: nothing changed since the last selection; keeping it.")
            return SelectResult(previous["samples"], previous["kept"], previous["dropped"], previous)
    for shard in store.done_shards(STAGE):  # never leave a mix of old and new decisions marked done
        store.fs.rm(store.path(*store.marker(STAGE, shard)))

    frame = load_scores(store, shards, text=False)
    sources = store.done_info(score.STAGE, shards[-1])["sources"]
    unscored = [n for n, sub in score_configs(cfg).items() if sub.source != "off" and n not in sources]
    if unscored:
        raise ValueError(f"filters.{unscored[0]} is on but the shards were scored without it; "
                         f"remove the score/ markers to score again")
    filters = build_filters(cfg, sources)
    thresholds = choose_thresholds(cfg, filters, frame)
    rows = Counter(frame["shard"])
    embeddings = load_embeddings(store, shards, rows) if cfg.dedup.enabled else None
    reasons, target = decide(cfg, filters, frame, embeddings)
    frame["reason"] = reasons
    frame["keep"] = reasons == ""

    # The frame is in shard order: each shard's rows are one slice of it.
    ends = np.cumsum([rows[s] for s in shards])
    parts = {s: frame.iloc[end - rows[s]:end] for s, end in zip(shards, ends)}
    for shard in shards:
        write_decisions(store, shard, parts[shard])
    dropped = Counter(r for r in reasons if r)
    for shard in shards:
        part = parts[shard]
        store.mark_done(STAGE, shard, selection_summary(part["key"], part["keep"], part["reason"], part["duplicate_of"]))
        if on_shard:
            on_shard(shard)
    summary = {
        "fingerprint": stamp, "samples": int(len(frame)), "kept": int(frame["keep"].sum()),
        "dropped": dict(sorted(dropped.items())), "filters": thresholds, "target": target,
        "order": [*ORDER, BELOW_TARGET], "sources": sources,
    }
    store.write_json(summary, "reports", "thresholds.json")
    log.info("Select: kept %d of %d samples.", summary["kept"], summary["samples"])
    return SelectResult(summary["samples"], summary["kept"], summary["dropped"], summary)
