"""Runs flows and store operations in one process, as a user's session would, for tests that need a
Ray started with this process's environment (storage settings and credentials reach its workers).

    python -m tests.flow_steps OUT.json STEP...

A STEP is a JSON list: ["curate", config, [override, ...]], ["rm", url], ["empty", url] (a marker
left empty by a crash), ["eval", config, [override, ...], [checkpoint, ...]] (the eval stage on the
demo's held-out prompts; its rows), ["cut_tar", url] (a tar cut at its last member's boundary: a shorter tar
that still reads as valid), ["snapshot", root] (every object's size and etag or mtime), or ["contents", root] (what the run
produced, comparable across roots). OUT.json receives one result per step.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import posixpath
import sys
import tarfile

import fsspec
import pyarrow.parquet as pq

from tessera.config import load_config
from tessera.demo.flow import heldout_prompts
from tessera.demo.synthetic import SyntheticSource
from tessera.flows.curate import curate
from tessera.pipelines import evaluate

# Keys that name where a run's inputs lived (model paths under models_root) or how long it took.
RUN_SPECIFIC = {"seconds", "fingerprint", "selection"}
# Rewritten by every run (reports), or img2dataset's timing statistics.
NOT_COMPARED = ("reports/", "_stats.json")


def _files(root: str) -> tuple[fsspec.AbstractFileSystem, str, list[dict]]:
    fs, base = fsspec.core.url_to_fs(root)
    fs.invalidate_cache()
    return fs, base, [e for e in fs.find(base, detail=True).values() if e["type"] == "file"]


def snapshot(root: str) -> dict[str, list]:
    fs, base, entries = _files(root)
    return {posixpath.relpath(e["name"], base): [e["size"], str(e.get("ETag") or e.get("mtime"))] for e in entries}


def _plain(value):
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items() if k not in RUN_SPECIFIC}
    return value


def contents(root: str) -> dict[str, object]:
    fs, base, entries = _files(root)
    out: dict[str, object] = {}
    for e in sorted(entries, key=lambda e: e["name"]):
        rel = posixpath.relpath(e["name"], base)
        if any(part in rel for part in NOT_COMPARED):
            continue
        data = fs.cat_file(e["name"])
        if rel.endswith(".parquet"):
            out[rel] = sorted(json.dumps(r, sort_keys=True, default=str) for r in pq.read_table(io.BytesIO(data)).to_pylist())
        elif rel.endswith(".tar"):
            with tarfile.open(fileobj=io.BytesIO(data)) as tar:
                out[rel] = {m.name: hashlib.sha256(tar.extractfile(m).read()).hexdigest() for m in tar if m.isfile()}
        elif rel.endswith((".json", ".done")):
            out[rel] = _plain(json.loads(data))
    return out


def serve_and_curate(config: str, overrides: list[str]) -> None:
    """The curate flow on the synthetic source, served while it runs (as the demo does)."""
    cfg = load_config(config, overrides)
    with SyntheticSource(cfg.source.synthetic, cfg.source.path, cfg.download.timeout):
        curate(config=config, overrides=overrides)


def main(out_path: str, steps: list[list]) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    results = []
    for step in steps:
        kind, *args = step
        if kind == "curate":
            serve_and_curate(args[0], args[1])
            results.append(None)
        elif kind == "eval":
            overrides = args[1] + heldout_prompts(load_config(args[0], args[1]))
            result = evaluate.run(load_config(args[0], overrides), checkpoints=args[2])
            results.append(json.loads(json.dumps(result.rows, default=str)))
        elif kind == "rm":
            fs, path = fsspec.core.url_to_fs(args[0])
            fs.rm(path)
            results.append(None)
        elif kind == "empty":
            fs, path = fsspec.core.url_to_fs(args[0])
            fs.pipe_file(path, b"")
            results.append(None)
        elif kind == "cut_tar":
            fs, path = fsspec.core.url_to_fs(args[0])
            data = fs.cat_file(path)
            with tarfile.open(fileobj=io.BytesIO(data)) as tar:
                last = tar.getmembers()[-1].offset
            fs.pipe_file(path, data[:last])
            results.append(None)
        elif kind == "snapshot":
            results.append(snapshot(args[0]))
        elif kind == "contents":
            results.append(contents(args[0]))
        else:
            raise ValueError(f"unknown step {kind!r}")
        with open(out_path, "w") as f:
            json.dump(results, f)


if __name__ == "__main__":
    main(sys.argv[1], [json.loads(s) for s in sys.argv[2:]])
