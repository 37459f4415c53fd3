"""Select, the filter report and the skip paths of caption and tokenize at LAION's shape: the
driver's peak memory, the wall time of every pass, and what the dedup passes cost.

Rows and shards are set apart (`--sizes rows:shards,...`): the same rows over more, smaller shards
show the driver's per-shard cost. Synthetic score shards are written in the store layout: scores
parquet (with sha256), CLIP-like embeddings .npy, and download/score markers of real size (a
download marker carries img2dataset's stats, about 2 KB). The embeddings are skewed as LAION's
are: Zipf-sized clusters, one placeholder image repeated `--placeholder` times (near-identical
copies: the semantic pass must group them), and 1% exact copies (same sha256 and embedding).

Then the distributed select (select.run) and the report (filter_report.build) run on a local Ray
in a fresh driver process, which prints its peak RSS (getrusage: the driver only), the wall time
of each pass, how many passes read every scores shard in full, the files the dedup passes wrote,
and the largest peak RSS of a worker that ran a dedup task (its worker's getrusage: an upper bound
of the task's own peak, imports included). The in-memory path (select_reference.exact_reference)
runs as the baseline where it fits (--baseline-max rows), and its decisions are checked against
the distributed ones. Then caption and tokenize run over shards
their markers say are finished for this selection (with a 16,384-code histogram beside each
tokenize marker, as real ones): what a rerun of a finished curation costs the driver. The driver's
own cost per shard at 100,000 shards is measured by bench/scale_driver.py.

Embeddings are 64-d float16 by default (--dim): 10M rows of 768-d embeddings would be 15 GB.

    python -m bench.scale [--sizes 10000000:10000,10000000:100000] [--dim 64] [--cpus 2]
"""
from __future__ import annotations

import argparse
import json
import logging
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

from tessera.config.caption import CaptionConfig
from tessera.config.filters import FiltersConfig
from tessera.config.ray import RayConfig
from tessera.config.tokenize import TokenizeConfig
from tessera.core import lineage
from tessera.core.raytools import init_ray
from tessera.core.store import ShardStore
from tessera.core.token_shards import tokens_folder
from tessera.models.refs import resolve
from tessera.pipelines import caption, filter_report, select, select_reference, select_work, semdedup, tokenize

CODEBOOK = 16384   # LlamaGen's VQ: a real shard's code histogram
SOURCES = {"clip_score": {"source": "compute", "column": None}, "aesthetic": {"source": "compute", "column": None},
           "watermark": {"source": "metadata", "column": "pwatermark"},
           "nsfw": {"source": "metadata", "column": "punsafe"}}
CENTERS = 256     # cluster centres, Zipf-sized
# The per-shard work that reads a whole scores shard (select's later passes read its compact file).
SCORES_READERS = (select_work.stats,)


def filters_config(rows: int, shards: int):
    return FiltersConfig.model_validate({
        "clip_score": {"min": 0.28}, "aesthetic": {"keep_fraction": 0.5},
        "watermark": {"source": "metadata", "keep_fraction": 0.9}, "nsfw": {"source": "metadata", "max": 0.5},
        "dedup": {"enabled": True, "min_similarity": 0.95, "niter": 10, "rows_per_cluster": 20_000,
                  "max_cluster_size": 50_000, "partitions": 16, "shards_per_task": max(16, shards // 64)},
        "target": {"fraction": 0.1, "rank_by": "clip_score"},
    })


def download_marker(n: int, rng) -> dict:
    """A download marker as img2dataset's stats make it: counts, error messages, timings."""
    errors = {f"HTTP Error {c}: {m}": int(rng.integers(0, 50)) for c, m in
              ((403, "Forbidden"), (404, "Not Found"), (410, "Gone"), (500, "Internal Server Error"),
               (502, "Bad Gateway"), (503, "Service Unavailable"))}
    errors.update({f"<urlopen error [Errno {e}] name or service not known for host cdn{i}.example.com>": 1
                   for i, e in enumerate(rng.integers(-5, 110, 24))})
    return {"rows_in": n, "downloaded": n, "dropped": {}, "count": n, "successes": n, "failed_to_download": 0,
            "failed_to_resize": 0, "duration": float(rng.uniform(100, 400)), "status_dict": errors,
            "start_time": 1.7e9, "end_time": 1.7e9 + 300, "config": {"image_size": 256, "resize_mode": "center_crop",
                                                                       "encode_quality": 95, "retries": 2}}


def write_shard(args) -> None:
    root, number, start, n, dim, total, placeholder = args
    stride = max(1, total // max(placeholder, 1))

    store = ShardStore(root)
    rng = np.random.default_rng(number)
    shard = f"{number:06d}"
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
    world = np.random.default_rng(0)
    centers = world.normal(size=(CENTERS, dim))
    zipf = 1.0 / np.arange(1, CENTERS + 1) ** 1.1
    emb = centers[rng.choice(CENTERS, size=n, p=zipf / zipf.sum())] + rng.normal(scale=0.6, size=(n, dim))
    sha = np.array([f"{i:064x}" for i in range(start, start + n)], dtype=object)
    index = np.arange(start, start + n)
    # The placeholder: every `stride`-th row of the world, up to `placeholder` rows, in every shard.
    mine = (index % stride == 0) & (index // stride < placeholder)
    emb[mine] = world.normal(size=dim) + rng.normal(scale=0.003, size=(int(mine.sum()), dim))
    # Exact copies: rows 100k+2 copy (bytes, so hash and embedding) a row 100j+1 of any shard,
    # whose embedding is drawn from its index alone.
    originals = np.flatnonzero((index % 100 == 1) & ~mine)
    for row in originals:
        emb[row] = np.random.default_rng(index[row]).normal(size=dim)
    for row in np.flatnonzero((index % 100 == 2) & ~mine):
        src = 100 * int(rng.integers(0, max(1, total // 100))) + 1
        if src % stride == 0 and src // stride < placeholder:
            continue  # that row is a placeholder copy
        emb[row] = np.random.default_rng(src).normal(size=dim)
        sha[row] = f"{src:064x}"
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    table = table.append_column("sha256", pa.array(sha.tolist(), pa.string()))
    with store.open_atomic("embeddings", f"{shard}.npy") as f:
        np.save(f, emb.astype(np.float16))
    store.write_table(table, "scores", f"{shard}.parquet")
    store.mark_done("download", shard, download_marker(n, rng))
    store.mark_done("score", shard, {"samples": n, "unreadable": {"corrupt_image": int((error != "").sum())},
                                     "sources": SOURCES})


def generate(root: str, rows: int, shards: int, dim: int, cpus: int, placeholder: int) -> None:
    per = np.full(shards, rows // shards)
    per[: rows % shards] += 1
    starts = np.concatenate([[0], np.cumsum(per)[:-1]])
    with Pool(cpus) as pool:
        pool.map(write_shard, [(root, i, int(s), int(n), dim, rows, placeholder)
                               for i, (s, n) in enumerate(zip(starts, per))], chunksize=64)


def mark_finished(store, caption_cfg, tokenize_cfg, models_root: str) -> None:
    """Caption and tokenize markers as a finished run leaves them for this selection, so that the
    stages' own skip paths (marker reads, lineage, restamping, manifests) are what is timed."""
    shards = lineage.input_shards(store)
    selection = lineage.selection_id(store)
    kept = {s: m["kept"] for s, m in store.markers("select").items()}
    model = resolve(caption_cfg.model, models_root)
    settings = caption.generation_settings(caption_cfg, "cpu")
    for shard, fp in lineage.shard_fingerprints(store, shards, caption.lineage(caption_cfg, model, settings)).items():
        store.mark_done("caption", shard, {"rows_in": kept[shard], "captioned": kept[shard], "fallback": {},
                                           "fingerprint": fp, "selection": selection})
    vq = resolve(tokenize_cfg.vq, models_root)
    counts = np.random.default_rng(0).integers(0, 1000, CODEBOOK)
    fps = lineage.shard_fingerprints(store, shards, tokenize.lineage(tokenize_cfg, vq, None), upstream=("caption",))
    for shard, fp in fps.items():
        done = {"rows_in": kept[shard], "fingerprint": fp, "selection": selection}
        for res in tokenize_cfg.resolutions:
            info = {"rows_in": kept[shard], "tokenized": kept[shard], "no_caption": 0, "dropped": {},
                    "bytes": 1000 * kept[shard]}
            tokenize.write_counts(store, res, shard, counts)
            store.mark_done(tokens_folder(res), shard, {**info, **done})
            done[str(res)] = info
        store.mark_done("tokenize", shard, done)


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class Passes:
    """Wall time of each pass of select and the report, and how many read every scores shard."""

    def __init__(self, shards: list[str]):
        self.shards, self.times, self.full_reads = set(shards), {}, 0

    def wrap(self, module, name: str) -> None:
        run = getattr(module, name)

        def timed(desc, store, names, work, *args, **kwargs):
            t = time.perf_counter()
            try:
                return run(desc, store, names, work, *args, **kwargs)
            finally:
                self.times[desc] = self.times.get(desc, 0.0) + time.perf_counter() - t
                self.full_reads += int(set(names) == self.shards and work in SCORES_READERS)

        setattr(module, name, timed)


def measure(root: str, path: str, rows: int, cpus: int) -> dict:
    """In this process (a fresh driver): run one code path; return its figures."""
    logging.basicConfig(level=logging.WARNING)
    store = ShardStore(root)
    shards = store.done_shards("score")
    cfg = filters_config(rows, len(shards))
    out = {"path": path, "start_mb": peak_mb()}
    if path == "exact":
        t = time.perf_counter()
        frame, summary = select_reference.exact_reference(cfg, store)
        out.update(select_s=time.perf_counter() - t, peak_mb=peak_mb(), kept=summary["kept"])
        stored = select_reference.load_scores(store, shards, decisions=True, text=False)
        out["equal"] = bool((stored["reason"].to_numpy() == frame["reason"].to_numpy()).all()
                            and (stored["duplicate_of"].to_numpy() == frame["duplicate_of"].to_numpy()).all())
        return out
    os.environ["TQDM_DISABLE"] = "1"
    init_ray(RayConfig(num_cpus=cpus))
    passes = Passes(shards)
    passes.wrap(select, "map_shards")
    passes.wrap(select, "run_stage")
    t = time.perf_counter()
    result = select.run(cfg, store)
    out["select_s"] = time.perf_counter() - t
    select_reads = passes.full_reads
    passes.wrap(filter_report, "map_shards")
    t = time.perf_counter()
    filter_report.build(store, result.funnel(), examples=cfg.report_examples)
    out.update(report_s=time.perf_counter() - t, kept=result.kept, dedup=result.thresholds.get("dedup", {}),
               passes=passes.times, select_full_reads=select_reads, report_full_reads=passes.full_reads - select_reads,
               dropped=result.dropped)
    out["worker_peak_mb"] = out["dedup"].get("task_peak_mb", 0)

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


def group_task(copies: int, others: int, dim: int, max_cluster_size: int) -> dict:
    """In this process (as one search task): one partition holding a placeholder group of `copies`
    near-identical embeddings among `others` rows of Zipf-sized clusters; time and peak memory of
    its search (semdedup.search), the second k-means level included."""
    rng = np.random.default_rng(0)
    centers = rng.standard_normal((CENTERS, dim), dtype=np.float32)
    zipf = 1.0 / np.arange(1, CENTERS + 1) ** 1.1
    emb = np.empty((others + copies, dim), np.float16)
    for a in range(0, others, 10_000):  # in blocks: the task's own memory is what is measured
        b = min(a + 10_000, others)
        x = centers[rng.choice(CENTERS, size=b - a, p=zipf / zipf.sum())]
        x += 0.6 * rng.standard_normal(x.shape, dtype=np.float32)
        emb[a:b] = x / np.linalg.norm(x, axis=1, keepdims=True)
    placeholder = rng.standard_normal(dim, dtype=np.float32)
    for a in range(others, others + copies, 10_000):
        b = min(a + 10_000, others + copies)
        x = placeholder + 0.003 * rng.standard_normal((b - a, dim), dtype=np.float32)
        emb[a:b] = x / np.linalg.norm(x, axis=1, keepdims=True)
    order = rng.permutation(len(emb))
    keys = np.array([f"{i:010d}" for i in range(len(emb))], dtype=object)[order]
    root = tempfile.mkdtemp(prefix="tessera-bench-group-")
    store = ShardStore(root)
    one = np.ones((1, dim), np.float32) / np.sqrt(dim)
    semdedup.send_embeddings(store, "00000", keys, np.zeros(len(emb), np.int64), emb[order], one, 0.05, 1)
    del emb
    start_mb = peak_mb()
    t, cpu = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
    found = semdedup.search(store, "00000", ["00000"], 1, 0.95, max_cluster_size, 1024, 0.05, 10)
    used = resource.getrusage(resource.RUSAGE_SELF)
    out = {"search_s": time.perf_counter() - t, "cpu_s": used.ru_utime + used.ru_stime - cpu.ru_utime - cpu.ru_stime,
           "peak_mb": peak_mb(), "start_mb": start_mb, **found}
    shutil.rmtree(root, ignore_errors=True)
    return out


def run_child(root: str, path: str, rows: int, cpus: int) -> dict:  # a fresh driver per measurement
    cmd = [sys.executable, "-m", "bench.scale", "--measure", path, "--root", root, "--rows", str(rows),
           "--cpus", str(cpus)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"{path} at {rows} rows failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="10000000:10000,10000000:100000", help="rows:shards,...")
    ap.add_argument("--placeholder", type=int, default=50_000, help="copies of the one placeholder image")
    ap.add_argument("--dim", type=int, default=64, help="embedding dimension (CLIP ViT-L/14: 768)")
    ap.add_argument("--cpus", type=int, default=2)
    ap.add_argument("--baseline-max", type=int, default=100_000,
                    help="largest size the in-memory path runs at (its all-pairs near-duplicate search holds "
                         "a 4096 x survivors float32 block: ~4 GB at 1M rows here)")
    ap.add_argument("--dir", default=None, help="where the shards are written (default: a temporary folder)")
    ap.add_argument("--group", default=None, metavar="COPIES:OTHERS",
                    help="only time one search task holding a placeholder group of COPIES among OTHERS rows")
    ap.add_argument("--max-cluster-size", type=int, default=50_000)
    ap.add_argument("--measure", choices=("distributed", "exact"), help=argparse.SUPPRESS)
    ap.add_argument("--root", help=argparse.SUPPRESS)
    ap.add_argument("--rows", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.measure:
        print(json.dumps(measure(args.root, args.measure, args.rows, args.cpus)))
        return
    if args.group:
        copies, others = (int(x) for x in args.group.split(":"))
        g = group_task(copies, others, args.dim, args.max_cluster_size)
        print(f"one search task: {copies:,} placeholder copies among {others:,} rows ({args.dim}-d): "
              f"{g['search_s']:.1f} s wall, {g['cpu_s']:.1f} s of CPU, peak RSS {g['peak_mb']:.0f} MB "
              f"(before the search {g['start_mb']:.0f} MB); "
              f"{g['duplicates']:,} duplicates, largest cluster {g['largest_cluster']:,}, split {g['split']}")
        return

    base = args.dir or tempfile.mkdtemp(prefix="tessera-bench-scale-")
    results = []
    for size in args.sizes.split(","):
        rows, shards = (int(x) for x in size.split(":"))
        root = os.path.join(base, f"rows{rows}")
        shutil.rmtree(root, ignore_errors=True)
        t = time.perf_counter()
        generate(root, rows, shards, args.dim, args.cpus, min(args.placeholder, rows // 4))
        print(f"{rows:,} rows in {shards:,} shards ({args.dim}-d embeddings) written in "
              f"{time.perf_counter() - t:.0f} s", flush=True)
        dist = run_child(root, "distributed", rows, args.cpus)
        print(f"  distributed: select {dist['select_s']:.1f} s, report {dist['report_s']:.1f} s, "
              f"caption skip {dist['caption_skip_s']:.2f} s, tokenize skip {dist['tokenize_skip_s']:.2f} s, "
              f"driver peak RSS {dist['peak_mb']:.0f} MB (after imports {dist['start_mb']:.0f} MB), "
              f"largest dedup task's worker peak RSS {dist['worker_peak_mb']:.0f} MB, kept {dist['kept']:,}",
              flush=True)
        print(f"  full reads per scores shard: select {dist['select_full_reads']}, report "
              f"{dist['report_full_reads']}; dedup: {dist['dedup']}", flush=True)
        print(f"  dropped: {dist['dropped']}", flush=True)
        print("  passes: " + ", ".join(f"{k} {v:.1f} s" for k, v in dist["passes"].items()), flush=True)
        exact = run_child(root, "exact", rows, args.cpus) if rows <= args.baseline_max else None
        if exact:
            print(f"  in-memory:   select {exact['select_s']:.1f} s, driver peak RSS {exact['peak_mb']:.0f} MB, "
                  f"kept {exact['kept']:,}, same decisions: {exact['equal']}", flush=True)
        results.append((rows, shards, dist, exact))
        shutil.rmtree(root, ignore_errors=True)
    if not args.dir:
        shutil.rmtree(base, ignore_errors=True)

    print(f"\n{'rows':>11} {'shards':>7} {'select s':>9} {'report s':>9} {'caption s':>10} {'tokenize s':>11} "
          f"{'peak MB':>8} {'worker MB':>10} {'dedup files':>12} {'in-memory s':>12} {'in-memory MB':>13}")
    for rows, shards, d, e in results:
        exact_s, exact_mb = (f"{e['select_s']:.1f}", f"{e['peak_mb']:.0f}") if e else ("-", "-")
        print(f"{rows:>11,} {shards:>7,} {d['select_s']:>9.1f} {d['report_s']:>9.1f} {d['caption_skip_s']:>10.2f} "
              f"{d['tokenize_skip_s']:>11.2f} {d['peak_mb']:>8.0f} {d['worker_peak_mb']:>10.0f} "
              f"{d['dedup'].get('files_written', 0):>12,} {exact_s:>12} {exact_mb:>13}")
    for (r0, s0, d0, _), (r1, s1, d1, _) in zip(results, results[1:]):
        print(f"{r0:,} rows / {s0:,} shards -> {r1:,} rows / {s1:,} shards: driver peak memory "
              f"{d1['peak_mb'] / d0['peak_mb']:.2f}x, select time {d1['select_s'] / d0['select_s']:.1f}x, "
              f"report time {d1['report_s'] / d0['report_s']:.1f}x")


if __name__ == "__main__":
    main()
