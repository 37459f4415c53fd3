"""The driver's own cost per shard at 1,000 to 100,000 shards: a rerun of a finished curation
(score, select, caption and tokenize, every shard done) after a re-selection that kept every
shard's decisions, so every caption and tokenize marker is restamped with the new selection.

What runs is what the stages' drivers do: list the stage folders, read the markers in batched
fetches, compute the lineage fingerprints, find nothing to redo, restamp (Ray tasks), sum the
token histograms (Ray tasks) and write the manifests. No shard's rows are read. The markers are
of real size: img2dataset's download stats (about 2 KB), the score sources, the tokenize counts,
and a sidecar code histogram per shard and resolution. The rows (`--rows`, split over the shards)
only set the counts in the markers and the histograms.

Each size runs in a fresh driver process, which prints the wall time of each stage, the driver's
own CPU time (its serial work: listing, markers, lineage, submitting tasks) per shard, and its
peak RSS while the stages run (/proc/self/status VmHWM, reset after the imports).

    python -m bench.scale_driver [--shards 1000,10000,100000] [--rows 1000000] [--cpus 2]
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

from bench.scale import download_marker, peak_mb
from tessera.config.caption import CaptionConfig
from tessera.config.filters import FiltersConfig
from tessera.config.ray import RayConfig
from tessera.config.tokenize import TokenizeConfig
from tessera.core import lineage
from tessera.core.raytools import init_ray
from tessera.core.store import ShardStore
from tessera.core.token_shards import tokens_folder
from tessera.filters import resolve_sources
from tessera.models.refs import resolve
from tessera.pipelines import caption, score, select, tokenize

CODEBOOK = 16384
RESOLUTIONS = [256]
# The columns of an img2dataset parquet of a LAION input, as a download marker records them.
COLUMNS = sorted(["key", "url", "caption", "status", "error_message", "width", "height", "original_width",
                  "original_height", "exif", "sha256", "row_index", "similarity", "hash", "punsafe", "pwatermark",
                  "aesthetic"])
SCORE_CFG = {"precision": "fp32", "clip": {"model": "tessera-tiny-clip", "checkpoint": "tiny:clip",
                                           "force_quick_gelu": False},
             "aesthetic": {"source": "metadata"}, "watermark": {"source": "metadata"},
             "nsfw": {"source": "metadata"}}


def write(path: str, blob: bytes) -> None:
    """Synthetic files are written plainly (no fsync): this is setup, not what is measured."""
    with open(path, "wb") as f:
        f.write(blob)


def write_markers(args) -> None:
    root, stage, items = args
    os.makedirs(os.path.join(root, stage), exist_ok=True)
    for shard, info in items:
        write(os.path.join(root, stage, f"{shard}.done"), json.dumps(info, indent=2, sort_keys=True).encode())


def write_first(args) -> None:
    """Download, score and select markers of a run of shards."""
    root, shards, rows, sources, score_fps = args
    rng = np.random.default_rng(int(shards[0]))
    for stage in ("download", "score", "select"):
        os.makedirs(os.path.join(root, stage), exist_ok=True)
    for shard in shards:
        n = rows[shard]
        kept = n // 10
        write_markers((root, "download", [(shard, {**download_marker(n, rng), "columns": COLUMNS,
                                                  "fingerprint": f"{int(shard):016x}", "tar_bytes": 30_000 * n})]))
        write_markers((root, "score", [(shard, {"rows_in": n, "samples": n, "unreadable": {"corrupt_image": 3},
                                               "sources": sources, "fingerprint": score_fps[shard], "seconds": 1.0})]))
        write_markers((root, "select", [(shard, {"rows_in": n, "kept": kept, "dropped": n - kept,
                                                "decisions": f"{int(shard) * 7:016x}", "reasons": {"near_duplicate": 3},
                                                "hist": {}, "fingerprint": "-", "seconds": 1.0})]))


def write_tokens(args) -> None:
    """Tokenize markers and the code histograms of a run of shards."""
    root, items, selection = args
    rng = np.random.default_rng(int(items[0][0]))
    for res in RESOLUTIONS:
        os.makedirs(os.path.join(root, tokens_folder(res)), exist_ok=True)
    os.makedirs(os.path.join(root, "tokenize"), exist_ok=True)
    for shard, fp, kept in items:
        done = {"rows_in": kept, "fingerprint": fp, "selection": selection}
        for res in RESOLUTIONS:
            counts = rng.multinomial(kept * (res // 16) ** 2, np.full(CODEBOOK, 1 / CODEBOOK))
            write(os.path.join(root, tokens_folder(res), shard + tokenize.COUNTS), tokenize.pack_counts(counts))
            info = {"rows_in": kept, "tokenized": kept, "no_caption": 0, "dropped": {}, "bytes": 1000 * kept}
            write_markers((root, tokens_folder(res), [(shard, {**info, **done})]))
            done[str(res)] = info
        write_markers((root, "tokenize", [(shard, done)]))


def chunks(items: list, n: int) -> list[list]:
    return [items[i:i + n] for i in range(0, len(items), n)]


def generate(root: str, shards: int, rows: int, cpus: int) -> None:
    store = ShardStore(root)
    names = [f"{i:06d}" for i in range(shards)]
    per = np.full(shards, rows // shards)
    per[: rows % shards] += 1
    counts = dict(zip(names, per.tolist()))
    models = os.path.join(root, "_models")
    cfg = FiltersConfig.model_validate(SCORE_CFG)
    sources = resolve_sources(cfg, set(COLUMNS))
    paths = score.model_paths(cfg, sources, models)
    downloads = {s: {"fingerprint": f"{int(s):016x}"} for s in names}
    score_fps = score.fingerprints(downloads, names, score.lineage(cfg, sources, paths))
    with Pool(cpus) as pool:
        pool.map(write_first, [(root, c, {s: counts[s] for s in c}, sources, score_fps) for c in chunks(names, 500)])
        # The selection: every shard decided, then a re-selection with the same decisions (a new id).
        stamp = select.fingerprint(cfg, store, names)
        store.write_json({"fingerprint": stamp, "samples": rows, "kept": rows // 10, "dropped": {}},
                         "reports", "thresholds.json")
        kept = {s: m["kept"] for s, m in store.markers("select").items()}
        caption_cfg, tokenize_cfg = CaptionConfig(model="tiny:llava"), TokenizeConfig(resolutions=RESOLUTIONS)
        model = resolve(caption_cfg.model, models)
        settings = caption.generation_settings(caption_cfg, "cpu")
        fps = lineage.shard_fingerprints(store, names, caption.lineage(caption_cfg, model, settings))
        pool.map(write_markers, [(root, "caption", [(s, {"rows_in": kept[s], "captioned": kept[s], "fallback": {},
                                                         "fingerprint": fps[s], "selection": "previous"}) for s in c])
                                 for c in chunks(names, 500)])
        vq = resolve(tokenize_cfg.vq, models)
        fps = lineage.shard_fingerprints(store, names, tokenize.lineage(tokenize_cfg, vq, None), upstream=("caption",))
        pool.map(write_tokens, [(root, [(s, fps[s], kept[s]) for s in c], "previous") for c in chunks(names, 500)])


def cpu_s() -> float:
    """CPU seconds of this process alone (the driver; Ray's workers are other processes)."""
    used = resource.getrusage(resource.RUSAGE_SELF)
    return used.ru_utime + used.ru_stime


def status_mb(field: str) -> float:
    """A memory figure of this process from /proc/self/status (VmRSS: now, VmHWM: peak), in MB."""
    with open("/proc/self/status") as f:
        line = next(x for x in f if x.startswith(field + ":"))
    return int(line.split()[1]) / 1024


def measure(root: str, cpus: int) -> dict:
    """In this process (a fresh driver): the stages' skip paths; their wall times, the driver's CPU
    time and its peak RSS while they run (the peak of the imports is reset first: it is the same at
    any shard count and would hide what the stages add)."""
    logging.basicConfig(level=logging.WARNING)
    os.environ["TQDM_DISABLE"] = "1"
    store = ShardStore(root)
    models = os.path.join(root, "_models")
    out = {"import_peak_mb": peak_mb(), "stages": {}}
    t = time.perf_counter()
    init_ray(RayConfig(num_cpus=cpus))
    out["ray_start_s"] = time.perf_counter() - t
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the RSS of now (Linux 4.0+)
    out["start_mb"] = status_mb("VmRSS")
    cfg = FiltersConfig.model_validate(SCORE_CFG)
    steps = [("score", lambda: score.run(cfg, RayConfig(num_cpus=cpus), store, models)),
             ("select", lambda: select.run(cfg, store)),
             ("caption", lambda: caption.run(CaptionConfig(model="tiny:llava"), RayConfig(num_cpus=cpus), store,
                                             models)),
             ("tokenize", lambda: tokenize.run(TokenizeConfig(resolutions=RESOLUTIONS), RayConfig(num_cpus=cpus),
                                               store, models))]
    out["cpu"], out["stage_peak_mb"] = {}, {}
    for name, step in steps:
        t, cpu = time.perf_counter(), cpu_s()
        step()
        out["stages"][name] = time.perf_counter() - t
        out["cpu"][name] = cpu_s() - cpu
        out["stage_peak_mb"][name] = status_mb("VmHWM")
    selection = lineage.selection_id(store)
    restamped = [m.get("selection") == selection for m in store.markers(tokens_folder(RESOLUTIONS[0])).values()]
    out.update(peak_mb=status_mb("VmHWM"), restamped=all(restamped) and len(restamped) > 0,
               manifest_samples=store.read_json(tokens_folder(RESOLUTIONS[0]), "manifest.json")["samples"])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shards", default="1000,10000,100000")
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--cpus", type=int, default=2)
    ap.add_argument("--dir", default=None, help="where the markers are written (default: a temporary folder)")
    ap.add_argument("--measure", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure, args.cpus)))
        return
    base = args.dir or tempfile.mkdtemp(prefix="tessera-bench-driver-")
    results = []
    for shards in (int(s) for s in args.shards.split(",")):
        root = os.path.join(base, f"shards{shards}")
        shutil.rmtree(root, ignore_errors=True)
        t = time.perf_counter()
        generate(root, shards, args.rows, args.cpus)
        print(f"{shards:,} shards ({args.rows:,} rows) of markers written in {time.perf_counter() - t:.0f} s",
              flush=True)
        done = subprocess.run([sys.executable, "-m", "bench.scale_driver", "--measure", root, "--cpus",
                               str(args.cpus)], capture_output=True, text=True)
        if done.returncode:
            raise RuntimeError(f"{shards} shards failed:\n{done.stderr[-3000:]}")
        r = json.loads(done.stdout.strip().splitlines()[-1])
        total, cpu = sum(r["stages"].values()), sum(r["cpu"].values())
        print("  wall: " + ", ".join(f"{k} {v:.1f} s" for k, v in r["stages"].items())
              + "; driver CPU: " + ", ".join(f"{k} {v:.1f} s" for k, v in r["cpu"].items())
              + "; peak RSS after: " + ", ".join(f"{k} {v:.0f} MB" for k, v in r["stage_peak_mb"].items())
              + f"; per shard {1000 * total / shards:.2f} ms wall, {1000 * cpu / shards:.2f} ms of the driver's "
              f"CPU; peak RSS while the stages ran {r['peak_mb']:.0f} MB (RSS before them {r['start_mb']:.0f} MB; "
              f"the imports' peak {r['import_peak_mb']:.0f} MB); every marker restamped: {r['restamped']}", flush=True)
        results.append((shards, r, total, cpu))
        shutil.rmtree(root, ignore_errors=True)
    if not args.dir:
        shutil.rmtree(base, ignore_errors=True)
    print(f"\n{'shards':>8} {'score s':>8} {'select s':>9} {'caption s':>10} {'tokenize s':>11} {'wall ms/shard':>14} "
          f"{'driver CPU ms/shard':>20} {'peak MB':>8}")
    for shards, r, total, cpu in results:
        s = r["stages"]
        print(f"{shards:>8,} {s['score']:>8.1f} {s['select']:>9.1f} {s['caption']:>10.1f} {s['tokenize']:>11.1f} "
              f"{1000 * total / shards:>14.2f} {1000 * cpu / shards:>20.2f} {r['peak_mb']:>8.0f}")
    first = results[0]
    for shards, r, _, _ in results[1:]:
        print(f"{first[0]:,} -> {shards:,} shards: driver peak RSS {r['peak_mb'] / first[1]['peak_mb']:.2f}x "
              f"({r['peak_mb'] - r['start_mb']:.0f} MB over the RSS before the stages, against "
              f"{first[1]['peak_mb'] - first[1]['start_mb']:.0f} MB)")


if __name__ == "__main__":
    main()
