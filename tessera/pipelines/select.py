"""The select stage: scores -> keep, or drop with one reason, for every scored sample.

1. Thresholds: absolute (`min`/`max`) or chosen from the score's distribution (`keep_fraction`).
2. Each filter in ORDER decides; a sample is dropped for the first filter it fails.
3. Exact copies (same sha256), then near-duplicates, among the survivors, over all shards at once
   (lowest key kept per group; semdedup.py).
4. `target`: the survivors ranked by one score (ties by key), exactly `count` kept.
5. keep, reason and duplicate_of are written to select/{shard}.parquet, then select/{shard}.done,
   then reports/thresholds.json (the run's thresholds, counts and a fingerprint of its inputs) and
   reports/histograms.json (each score's kept and dropped counts over fixed bins, for the report).

The work is spread over Ray tasks, one per shard or group of shards (select_work.py, semdedup.py),
and the driver only merges what they return, in memory that does not grow with the number of rows: quantile sketches
locate each keep_fraction threshold and the target boundary, and the few rows near a boundary
settle it exactly (quantiles.py), so the result equals the in-memory selection (select_reference.py).

Selection is global (distributions, duplicates and the target span every shard), so it is redone
as a whole whenever the scored shards or the config change, and skipped when neither did.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
from collections import Counter
from dataclasses import dataclass

import numpy as np

from tessera.config.filters import FiltersConfig
from tessera.core import quantiles
from tessera.core.funnel import DROPPED, StageResult, by_reason
from tessera.core.runtime import ShardFailures, map_shards, run_stage
from tessera.core.stage import Stage
from tessera.core.store import MARKER_BATCH, ShardStore
from tessera.filters import BELOW_TARGET, ORDER, ThresholdFilter, score_configs
from tessera.pipelines import score, select_work, semdedup
from tessera.pipelines.select_work import HISTOGRAMS, STAGE, Plan, histogram_marks

log = logging.getLogger(__name__)
KEPT = "kept"
HIST_BINS = 40


@dataclass
class SelectResult(StageResult):
    samples: int
    kept: int
    dropped: dict[str, int]
    thresholds: dict

    def outcomes(self) -> list[tuple[str, str, str, int]]:
        return [(STAGE, KEPT, "", self.kept), *by_reason(STAGE, DROPPED, self.dropped)]


STEP = Stage(STAGE, inputs=(score.SCORES, score.EMBEDDINGS), outputs=(STAGE,), work=select_work.apply,
             result=SelectResult)


def fingerprint(cfg: FiltersConfig, store: ShardStore, shards: list[str]) -> str:
    """The selection's inputs: its config and what each scored shard holds (not how long it took).
    The digest of json.dumps({"cfg", "infos", "shards"}, sort_keys=True), fed one batch of score
    markers at a time: the driver never holds every marker, nor the whole text."""
    digest = hashlib.sha256(f'{{"cfg": {json.dumps(cfg.model_dump(mode="json"), sort_keys=True)}, "infos": ['.encode())
    for i in range(0, len(shards), MARKER_BATCH):
        batch = shards[i:i + MARKER_BATCH]
        markers = store.read_markers(score.STAGE, batch)
        if len(markers) < len(batch):
            missing = next(s for s in batch if s not in markers)
            raise ValueError(f"{store.url(*store.marker(score.STAGE, missing))}: the score marker is unreadable; "
                             "remove it to score that shard again")
        infos = (json.dumps({k: v for k, v in markers[s].items() if k != "seconds"}, sort_keys=True) for s in batch)
        digest.update(((", " if i else "") + ", ".join(infos)).encode())
    digest.update(f'], "shards": {json.dumps(shards)}}}'.encode())
    return digest.hexdigest()[:16]


def choose_thresholds(cfg: FiltersConfig, plan: Plan, store: ShardStore, shards: list[str],
                      sketches: dict[str, quantiles.kll_doubles_sketch]) -> dict:
    """Set each score filter's threshold (absolute, or from its distribution); describe them all."""
    subs = score_configs(cfg)
    filters = [f for f in plan.filters() if isinstance(f, ThresholdFilter)]
    problems = {}
    for f in filters:
        sub = subs[f.name]
        plan.thresholds[f.name] = f.threshold
        if sub.keep_fraction is None:
            continue
        sk = sketches[f.name]
        if sk.n == 0:
            log.warning("%s: no valid scores to choose a keep_fraction threshold from.", f.column)
            continue
        rank = max(1, int(np.ceil(sub.keep_fraction * sk.n)))
        problems[f.name] = quantiles.Problem(rank=rank, total=sk.n, sketch=sk)
    specs = {f.name: {"column": f.column, "higher": f.higher_is_better, "rows": "readable"} for f in filters}
    for name, (b, _) in settle(problems, specs, plan, store, shards).items():
        plan.thresholds[name] = -b if specs[name]["higher"] else b
    described = {}
    for f in plan.filters():
        if isinstance(f, ThresholdFilter):
            keep_fraction = subs[f.name].keep_fraction
            mode = "absolute" if f.threshold is not None else "none"
            if keep_fraction is not None:
                mode = f"keep_fraction {keep_fraction}" + ("" if f.name in problems else " (no valid scores)")
            described[f.name] = {**f.describe(), "mode": mode}
        else:
            described[f.name] = f.describe()
    return described


def settle(problems: dict[str, quantiles.Problem], specs: dict[str, dict], plan: Plan, store: ShardStore,
           shards: list[str]) -> dict[str, tuple[float, str]]:
    k = plan.cfg.sketch_k

    def query(windows: dict) -> dict:
        asked = {n: {**specs[n], "lo": lo, "hi": hi, "gather": g} for n, (lo, hi, g) in windows.items()}
        tallies = {n: quantiles.Tally(k) for n in asked}

        def fold(_shard: str, part: dict) -> None:
            for n, answer in part.items():
                tallies[n].add(answer)

        map_shards(f"{STAGE}:settle", store, shards, select_work.window,
                   kwargs={"plan": plan, "problems": asked, "k": k}, fold=fold)
        return {n: t.result() for n, t in tallies.items()}

    return quantiles.settle(problems, query, plan.cfg.max_gather) if problems else {}


def find_duplicates(cfg: FiltersConfig, plan: Plan, store: ShardStore, shards: list[str]) -> dict:
    """Exact copies, then near-duplicates, among the survivors of every filter so far (semdedup.py);
    leaves semdedup/decided/ for the decisions."""
    d = cfg.dedup
    if store.exists(semdedup.DEDUP):
        store.fs.rm(store.path(semdedup.DEDUP), recursive=True)
    groups = select_work.dedup_tasks(shards, d.shards_per_task)
    tasks = max(1, math.ceil(len(shards) / d.shards_per_task))
    writers = list(groups)
    partitions = [semdedup.name(p) for p in range(d.partitions)]
    quota = max(1, math.ceil(d.sample_size / len(shards))) if d.enabled else 0
    samples, info, largest = [], Counter(), {"largest_cluster": 0, "task_peak_mb": 0.0}

    def count(_name: str, summary: dict) -> None:
        for k in largest:
            largest[k] = max(largest[k], summary.get(k, 0))
        info.update({k: v for k, v in summary.items() if k not in ("sample", *largest)})
        if summary.get("sample") is not None:
            samples.append(summary["sample"])

    by_task = {"shard_kwargs": lambda t: {"shards": groups[t]}, "fold": count}
    map_shards(f"{STAGE}:dedup-scan", store, writers, select_work.dedup_scan,
               kwargs={"plan": plan, "partitions": d.partitions, "quota": quota, "exact": d.exact}, **by_task)
    if d.exact:
        map_shards(f"{STAGE}:dedup-exact", store, partitions, semdedup.exact_search,
                   kwargs={"writers": writers, "tasks": tasks}, fold=count)
    if samples:
        centroids = semdedup.train(samples, d.clusters_for(info["survivors"]), d.niter)
        samples.clear()
        map_shards(f"{STAGE}:dedup-assign", store, writers, select_work.dedup_assign,
                   kwargs={"plan": plan, "centroids": centroids, "spill_margin": d.spill_margin,
                           "partitions": d.partitions}, **by_task)
        searched = partitions[:min(d.partitions, len(centroids))]
        map_shards(f"{STAGE}:dedup-search", store, searched, semdedup.search, fold=count,
                   kwargs={"writers": writers, "tasks": tasks, "min_similarity": d.min_similarity,
                           "max_cluster_size": d.max_cluster_size, "block": d.block,
                           "spill_margin": d.spill_margin, "niter": d.niter})
        map_shards(f"{STAGE}:dedup-merge", store, ["all"], semdedup.merge, kwargs={"partitions": searched},
                   fold=count)
        info["clusters"] = len(centroids)
    map_shards(f"{STAGE}:dedup-resolve", store, writers, semdedup.resolve,
               kwargs={"partitions": partitions, "tasks": tasks},
               fold=count)
    plan.dedup_done, plan.dedup_tasks = True, tasks
    return {**info, "largest_cluster": largest["largest_cluster"], "task_peak_mb": round(largest["task_peak_mb"]),
            "tasks": len(writers)}


def choose_target(cfg: FiltersConfig, plan: Plan, store: ShardStore, shards: list[str], samples: int) -> dict:
    t = cfg.target
    if t.count is None and t.fraction is None:
        return {}
    column, higher = plan.rank_by
    want = t.count if t.count is not None else int(round(t.fraction * samples))
    sk, survivors = quantiles.kll_doubles_sketch(cfg.sketch_k), 0

    def fold(_shard: str, part: dict) -> None:
        nonlocal survivors
        survivors += part["survivors"]
        sk.merge(quantiles.kll_doubles_sketch.deserialize(part["sketch"]))

    map_shards(f"{STAGE}:rank", store, shards, select_work.ranked, kwargs={"plan": plan, "k": cfg.sketch_k},
               fold=fold)
    keep = min(want, survivors)
    target = {"requested": want, "rank_by": column, "kept": int(keep), "threshold": None,
              "keep_if": ">=" if higher else "<="}
    if keep == 0:
        plan.target_empty = True
    else:
        problem = quantiles.Problem(rank=keep, total=survivors, sketch=sk)
        spec = {"target": {"column": column, "higher": higher, "rows": "survivors"}}
        b, key = settle({"target": problem}, spec, plan, store, shards)["target"]
        plan.boundary = (b, key)
        target["threshold"] = float("nan") if math.isinf(b) else (-b if higher else b)
    if keep < want:
        target["shortfall"] = int(want - keep)
        log.warning("Only %d samples pass every filter; the target was %d.", keep, want)
    return target


def histogram_edges(summary: dict, ranges: dict[str, tuple[float, float]]) -> dict[str, list[float]]:
    """Fixed bins per histogram column: its value range, widened to show every threshold mark."""
    marks = histogram_marks(summary)
    edges = {}
    for column in HISTOGRAMS:
        if column not in ranges:
            continue
        lo, hi = ranges[column]
        for t, _ in marks.get(column, []):
            if t is not None and not (isinstance(t, float) and math.isnan(t)):
                lo, hi = min(lo, t), max(hi, t)
        if hi <= lo:
            lo, hi = lo - 0.5, hi + 0.5
        edges[column] = np.linspace(lo, hi, HIST_BINS + 1).tolist()
    return edges


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
    if store.exists("reports", "thresholds.json") and set(store.done_shards(STAGE)) >= set(shards):
        previous = store.read_json("reports", "thresholds.json")
        if previous.get("fingerprint") == stamp:
            log.info("Select: nothing changed since the last selection; keeping it.")
            return SelectResult(previous["samples"], previous["kept"], previous["dropped"], previous)

    sources = store.done_info(score.STAGE, shards[-1])["sources"]
    unscored = [n for n, sub in score_configs(cfg).items() if sub.source != "off" and n not in sources]
    if unscored:
        raise ValueError(f"filters.{unscored[0]} is on but the shards were scored without it; "
                         f"remove the score/ markers to score again")
    if cfg.dedup.enabled and not set(store.list(score.EMBEDDINGS, ".npy")) >= {f"{s}.npy" for s in shards}:
        raise ValueError("near-duplicate search needs the image embeddings, which were not stored "
                         "(filters.dedup was enabled after scoring; remove the score/ markers to score again)")
    plan = Plan(cfg, sources)
    sketched = {f.name: (f.column, f.higher_is_better) for f in plan.filters()
                if isinstance(f, ThresholdFilter) and score_configs(cfg)[f.name].keep_fraction is not None}

    # Pass 1: per-shard sketches and ranges; the driver merges them and settles the thresholds.
    samples, columns, ranges = 0, None, {}
    sketches = {name: quantiles.kll_doubles_sketch(cfg.sketch_k) for name in sketched}

    def fold(_shard: str, s: dict) -> None:
        nonlocal samples, columns
        samples += s["rows"]
        columns = set(s["columns"]) if columns is None else columns & set(s["columns"])
        for name, blob in s["sketches"].items():
            sketches[name].merge(quantiles.kll_doubles_sketch.deserialize(blob))
        for col, (lo, hi) in s["ranges"].items():
            old = ranges.get(col, (lo, hi))
            ranges[col] = (min(old[0], lo), max(old[1], hi))

    map_shards(f"{STAGE}:stats", store, shards, select_work.stats,
               kwargs={"sketched": sketched, "ranged": list(HISTOGRAMS), "k": cfg.sketch_k}, fold=fold)
    for f in plan.filters():
        if isinstance(f, ThresholdFilter) and f.column not in columns:
            raise ValueError(f"the scores have no {f.column!r} column: filters.{f.name} was enabled after "
                             f"scoring; remove the score/ markers to score again")
    if (cfg.target.count is not None or cfg.target.fraction is not None) and cfg.target.rank_by not in columns:
        raise ValueError(f"filters.target.rank_by: the scores have no {cfg.target.rank_by!r} "
                         f"(is filters.{cfg.target.rank_by} off?)")
    thresholds = choose_thresholds(cfg, plan, store, shards, sketches)

    dedup = find_duplicates(cfg, plan, store, shards) if cfg.dedup.enabled or cfg.dedup.exact else {}
    target = choose_target(cfg, plan, store, shards, samples)

    summary = {"fingerprint": stamp, "samples": int(samples), "filters": thresholds, "target": target,
               "order": [*ORDER, BELOW_TARGET], "sources": sources}
    if dedup:
        summary["dedup"] = dedup
    edges = histogram_edges(summary, ranges)
    # Decisions per shard, as a stage: a shard already decided by this same selection (a crashed
    # apply) is kept; one decided by an older selection is redone.
    ran = run_stage(STEP.name, store, shards, STEP.work, kwargs={"plan": plan, "edges": edges},
                    fingerprints={s: stamp for s in shards}, retries=cfg.shard_retries, on_shard=on_shard,
                    unit="rows")
    if ran.failed:  # a partial selection would change which samples are kept: none is published
        raise ShardFailures({STAGE: ran.failed})
    kept, dropped = 0, Counter()
    hists = {c: [np.zeros(HIST_BINS, np.int64), np.zeros(HIST_BINS, np.int64)] for c in edges}
    selected = set(shards)
    for result in (m for s, m in store.markers(STAGE, fields=("kept", "reasons", "hist")).items() if s in selected):
        kept += result["kept"]
        dropped.update(result["reasons"])
        for col, (k_, d_) in result["hist"].items():
            hists[col][0] += k_
            hists[col][1] += d_
    for folder in (semdedup.DEDUP, select_work.COMPACT):
        if store.exists(folder):
            store.fs.rm(store.path(folder), recursive=True)
    store.write_json({c: {"edges": edges[c], "kept": h[0].tolist(), "dropped": h[1].tolist()}
                      for c, h in hists.items()}, "reports", "histograms.json")
    summary.update(kept=int(kept), dropped=dict(sorted(dropped.items())))
    store.write_json(summary, "reports", "thresholds.json")
    log.info("Select: kept %d of %d samples.", summary["kept"], summary["samples"])
    return SelectResult(summary["samples"], summary["kept"], summary["dropped"], summary)


__all__ = ["STEP", "SelectResult", "run"]
