"""Select, the filter report and the skip paths of caption and tokenize at three sizes: the
driver's peak memory and the wall time.

Synthetic score shards (scores parquet, CLIP-like embeddings .npy and the score markers, in the
store layout) are written at each size, then the distributed select (select.run) and the report
(filter_report.build) run on a local Ray in a fresh driver process, whose peak RSS (getrusage, the driver
process only: Ray's workers and daemons are other processes) and wall time are printed per size,
with the growth ratios between sizes. The previous in-memory path (select_reference.exact_reference) runs on
the same shards as the baseline where it fits (--baseline-max rows), and its decisions are checked
against the distributed ones. Then caption and tokenize run over shards their markers say are
finished for this selection: what a rerun of a finished curation costs the driver.

Embeddings are 64-d float16 by default (--dim): 10M rows of 768-d embeddings would be 15 GB.

    python -m bench.scale [--sizes 100000:100,1000000:1000,10000000:10000] [--dim 64] [--cpus 2]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from multiprocessing import Pool

import numpy as np
import pyarrow as pa

SOURCES = {"clip_score": {"source": "compute", "column": None}, "aesthetic": {"source": "compute", "column": None},
           "watermark": {"source": "metadata", "column": "pwatermark"},
           "nsfw": {"source": "metadata", "column": "punsafe"}}
POOL = 2000  # duplicated images: about 1% of the rows repeat one of these, in any shard


def filters_config(rows: int):
    from tessera.config.filters import FiltersConfig

    return FiltersConfig.model_validate({
        "clip_score": {"min": 0.28}, "aesthetic": {"keep_fraction": 0.5},
        "watermark": {"source": "metadata", "keep_fraction": 0.9}, "nsfw": {"source": "metadata", "max": 0.5},
        "dedup": {"enabled": True, "min_similarity": 0.95, "n_clusters": max(1, rows // 20_000), "niter": 10},
        "target": {"fraction": 0.1, "rank_by": "clip_score"},
    })


def write_shard(args) -> None:
    root, index, start, n, dim = args
    from tessera.core.store import ShardStore

    store = ShardStore(root)
    rng = np.random.default_rng(index)
    shard = f"{index:05d}"
    w = rng.integers(200, 1024, n)
    h = rng.integers(200, 1024, n)
    error = np.where(rng.random(n) < 0.03, "corrupt_image", "")
    clip = np.round(rng.normal(0.32, 0.04, n), 4)
    clip[error != ""] = np.nan
    table = pa.table({
        "key": [f"{i:010d}" for i in range(start, start + n)], "error": error.tolist(),
        "original_width": w, "original_height": h,
        "short_side": np.minimum(w, h).astype(np.float64), "aspect_ratio": np.maximum(w, h) / np.minimum(w, h),
        "caption_chars": rng.integers(0, 200, n), "caption_words": rng.integers(0, 30, n),
        "caption_letter_fraction": rng.uniform(0.45, 1.0, n),
        "clip_score": clip, "aesthetic": np.round(rng.normal(5.5, 0.8, n), 3),
        "pwatermark": np.round(rng.beta(1, 6, n), 3), "punsafe": np.round(rng.beta(1, 20, n), 3),
    })
    emb = rng.normal(size=(n, dim)).astype(np.float32)
    dup = rng.random(n) < 0.01
    pool = np.random.default_rng(0).normal(size=(POOL, dim)).astype(np.float32)
    emb[dup] = pool[rng.integers(0, POOL, dup.sum())] + rng.normal(scale=0.02, size=(dup.sum(), dim))
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    with store.open_atomic("embeddings", f"{shard}.npy") as f:
        np.save(f, emb.astype(np.float16))
    store.write_table(table, "scores", f"{shard}.parquet")
    store.mark_done("download", shard, {"rows_in": n, "downloaded": n, "dropped": {}})
    store.mark_done("score", shard, {"samples": n, "unreadable": {"corrupt_image": int((error != "").sum())},
                                     "sources": SOURCES})


def generate(root: str, rows: int, shards: int, dim: int, cpus: int) -> None:
    per = np.full(shards, rows // shards)
    per[: rows % shards] += 1
    starts = np.concatenate([[0], np.cumsum(per)[:-1]])
    with Pool(cpus) as pool:
        pool.map(write_shard, [(root, i, int(s), int(n), dim) for i, (s, n) in enumerate(zip(starts, per))],
                 chunksize=16)


def mark_finished(store, caption_cfg, tokenize_cfg, models_root: str) -> None:
    """Caption and tokenize markers as a finished run leaves them for this selection, so that the
    stages' own skip paths (marker reads, lineage, restamping, manifests) are what is timed."""
    from tessera.models.refs import resolve
    from tessera.pipelines import caption, tokenize
    from tessera.core import lineage
    from tessera.core.token_shards import tokens_folder

    shards = lineage.input_shards(store)
    selection = lineage.selection_id(store)
    kept = {s: m["kept"] for s, m in store.markers("select").items()}
    model = resolve(caption_cfg.model, models_root)
    settings = caption.generation_settings(caption_cfg, "cpu")
    for shard, fp in lineage.shard_fingerprints(store, shards, caption.lineage(caption_cfg, model, settings)).items():
        store.mark_done("caption", shard, {"rows_in": kept[shard], "captioned": kept[shard], "fallback": {},
                                           "fingerprint": fp, "selection": selection})
    vq = resolve(tokenize_cfg.vq, models_root)
    counts = tokenize._pack_counts(np.zeros(512, np.int64))
    fps = lineage.shard_fingerprints(store, shards, tokenize.lineage(tokenize_cfg, vq, None), upstream=("caption",))
    for shard, fp in fps.items():
        done = {"rows_in": kept[shard], "fingerprint": fp, "selection": selection}
        for res in tokenize_cfg.resolutions:
            info = {"rows_in": kept[shard], "tokenized": kept[shard], "no_caption": 0, "dropped": {},
                    "bytes": 1000 * kept[shard], "code_counts": counts}
            store.mark_done(tokens_folder(res), shard, {**info, **done})
            done[str(res)] = info
        store.mark_done("tokenize", shard, done)


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure(root: str, path: str, rows: int, cpus: int) -> dict:
    """In this process (a fresh driver): run one code path; return its figures."""
    import logging

    from tessera.config.ray import RayConfig
    from tessera.pipelines import filter_report, select, select_reference
    from tessera.core.raytools import init_ray
    from tessera.core.store import ShardStore

    logging.basicConfig(level=logging.WARNING)
    store = ShardStore(root)
    cfg = filters_config(rows)
    out = {"path": path, "start_mb": peak_mb()}
    if path == "exact":
        t = time.perf_counter()
        frame, summary = select_reference.exact_reference(cfg, store)
        out.update(select_s=time.perf_counter() - t, peak_mb=peak_mb(), kept=summary["kept"])
        stored = select_reference.load_scores(store, store.done_shards("score"), decisions=True, text=False)
        out["equal"] = bool((stored["reason"].to_numpy() == frame["reason"].to_numpy()).all()
                            and (stored["duplicate_of"].to_numpy() == frame["duplicate_of"].to_numpy()).all())
        return out
    os.environ["TQDM_DISABLE"] = "1"
    init_ray(RayConfig(num_cpus=cpus))
    t = time.perf_counter()
    result = select.run(cfg, store)
    out["select_s"] = time.perf_counter() - t
    t = time.perf_counter()
    filter_report.build(store, result.funnel(), examples=cfg.report_examples)
    out.update(report_s=time.perf_counter() - t, kept=result.kept, dedup=result.thresholds.get("dedup", {}))

    from tessera.config.caption import CaptionConfig
    from tessera.config.tokenize import TokenizeConfig
    from tessera.pipelines import caption, tokenize

    models = os.path.join(root, "_models")
    caption_cfg, tokenize_cfg = CaptionConfig(model="tiny:llava"), TokenizeConfig(resolutions=[256])
    mark_finished(store, caption_cfg, tokenize_cfg, models)
    t = time.perf_counter()
    skipped = caption.run(caption_cfg, RayConfig(num_cpus=cpus), store, models)
    out["caption_skip_s"] = time.perf_counter() - t
    t = time.perf_counter()
    tokens = tokenize.run(tokenize_cfg, RayConfig(num_cpus=cpus), store, models)
    out.update(tokenize_skip_s=time.perf_counter() - t, peak_mb=peak_mb())
    assert skipped.rows_in == result.kept == tokens.per_resolution[256]["tokenized"], "the skip paths lost rows"
    return out


def run_child(root: str, path: str, rows: int, cpus: int) -> dict:
    cmd = [sys.executable, "-m", "bench.scale", "--measure", path, "--root", root, "--rows", str(rows),
           "--cpus", str(cpus)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"{path} at {rows} rows failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="100000:100,1000000:1000,10000000:10000", help="rows:shards,...")
    ap.add_argument("--dim", type=int, default=64, help="embedding dimension (CLIP ViT-L/14: 768)")
    ap.add_argument("--cpus", type=int, default=2)
    ap.add_argument("--baseline-max", type=int, default=100_000,
                    help="largest size the in-memory path runs at (its all-pairs near-duplicate search holds "
                         "a 4096 x survivors float32 block: ~4 GB at 1M rows here)")
    ap.add_argument("--dir", default=None, help="where the shards are written (default: a temporary folder)")
    ap.add_argument("--measure", choices=("distributed", "exact"), help=argparse.SUPPRESS)
    ap.add_argument("--root", help=argparse.SUPPRESS)
    ap.add_argument("--rows", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.measure:
        print(json.dumps(measure(args.root, args.measure, args.rows, args.cpus)))
        return

    base = args.dir or tempfile.mkdtemp(prefix="tessera-bench-scale-")
    results = []
    for size in args.sizes.split(","):
        rows, shards = (int(x) for x in size.split(":"))
        root = os.path.join(base, f"rows{rows}")
        shutil.rmtree(root, ignore_errors=True)
        t = time.perf_counter()
        generate(root, rows, shards, args.dim, args.cpus)
        print(f"{rows:,} rows in {shards:,} shards ({args.dim}-d embeddings) written in "
              f"{time.perf_counter() - t:.0f} s", flush=True)
        dist = run_child(root, "distributed", rows, args.cpus)
        print(f"  distributed: select {dist['select_s']:.1f} s, report {dist['report_s']:.1f} s, "
              f"caption skip {dist['caption_skip_s']:.2f} s, tokenize skip {dist['tokenize_skip_s']:.2f} s, "
              f"driver peak RSS {dist['peak_mb']:.0f} MB (after imports {dist['start_mb']:.0f} MB), "
              f"kept {dist['kept']:,}, dedup {dist['dedup']}", flush=True)
        exact = run_child(root, "exact", rows, args.cpus) if rows <= args.baseline_max else None
        if exact:
            print(f"  in-memory:   select {exact['select_s']:.1f} s, driver peak RSS {exact['peak_mb']:.0f} MB, "
                  f"kept {exact['kept']:,}, same decisions: {exact['equal']}", flush=True)
        results.append((rows, shards, dist, exact))
        shutil.rmtree(root, ignore_errors=True)
    if not args.dir:
        shutil.rmtree(base, ignore_errors=True)

    print(f"\n{'rows':>11} {'shards':>7} {'select s':>9} {'report s':>9} {'caption s':>10} {'tokenize s':>11} "
          f"{'peak MB':>8} {'in-memory s':>12} {'in-memory MB':>13}")
    for rows, shards, d, e in results:
        exact_s, exact_mb = (f"{e['select_s']:.1f}", f"{e['peak_mb']:.0f}") if e else ("-", "-")
        print(f"{rows:>11,} {shards:>7,} {d['select_s']:>9.1f} {d['report_s']:>9.1f} {d['caption_skip_s']:>10.2f} "
              f"{d['tokenize_skip_s']:>11.2f} {d['peak_mb']:>8.0f} {exact_s:>12} {exact_mb:>13}")
    for (r0, _, d0, _), (r1, _, d1, _) in zip(results, results[1:]):
        print(f"{r0:,} -> {r1:,} rows ({r1 / r0:.0f}x): driver peak memory {d1['peak_mb'] / d0['peak_mb']:.2f}x, "
              f"select time {d1['select_s'] / d0['select_s']:.1f}x, report time {d1['report_s'] / d0['report_s']:.1f}x")


if __name__ == "__main__":
    main()
