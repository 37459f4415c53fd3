"""Inputs that are read, not downloaded: an image folder, WebDataset tars, Hugging Face parquet.

`prepare` lists the input once in the driver and cuts it into input shards
(`download/_input/{shard}.parquet`: what to read, never the images). `ingest_shard` reads one input
shard, passes every image through the same checks and resizing as a downloaded one
(imagecheck.SafeResizer), and writes what the download stage writes, so every later stage reads
it unchanged:

    download/{shard}.tar                {key}.jpg, {key}.txt, {key}.json, in img2dataset's layout
    download/{shard}.parquet            one status row per sample read; failures with their error
    download/{shard}_stats.json         img2dataset's per-shard stats
    download/{shard}_rejected.parquet   files refused while listing (not an image, no image)
    download/{shard}.done               {rows_in, downloaded, dropped: {reason: count}}

Keys are img2dataset's (the shard number, then the sample's number in the shard). A sample's `url`
is where it came from: the image file, `{tar}#{member key}` (or the URL an img2dataset json
records), or `{parquet}#{row}`.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import os
import posixpath
import shutil
import tempfile
import time
from collections import Counter, deque
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterable, Iterator

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from tessera.config.download import CaptionFiles, DownloadConfig, SourceConfig
from tessera.config.ray import RayConfig
from tessera.core.stage import Stage
from tessera.core.store import ShardStore, shard_name
from tessera.pipelines.download import (
    INPUT,
    STAGE,
    DownloadResult,
    InputError,
    prepared_shards,
    reason_for,
    summarize,
)

log = logging.getLogger(__name__)

# A sample to read: where it came from, its input position, and how to load
# (image bytes or None, caption or None, carried metadata).
Loaded = tuple[bytes | None, str | None, dict]
Sample = tuple[str, int, Callable[[], Loaded]]

# Errors of our own, before img2dataset's vocabulary (download.reason_for) is consulted.
_OWN_REASONS = {"missing caption": "missing_caption", "missing image": "missing_image", "read error": "read_error"}


def reason_of(error_message: str | None) -> str:
    for prefix, reason in _OWN_REASONS.items():
        if (error_message or "").startswith(prefix):
            return reason
    return reason_for(error_message)


# Listing ----------------------------------------------------------------------------------
def list_files(url: str, suffixes: tuple[str, ...]) -> tuple[fsspec.AbstractFileSystem, list[str]]:
    """A file, a folder (searched recursively for `suffixes`) or a glob; local or fsspec."""
    fs, path = fsspec.core.url_to_fs(url)
    if any(c in path for c in "*?["):
        files = sorted(fs.glob(path))
    elif fs.isdir(path):
        files = sorted(p for p in fs.find(path) if p.lower().endswith(suffixes))
    else:
        files = [path] if fs.exists(path) else []
    if not files:
        raise InputError(f"no {' or '.join(suffixes)} files found at {url}")
    return fs, files


def _full_url(fs: fsspec.AbstractFileSystem, path: str) -> str:
    return path if "file" in fs.protocol or "local" in fs.protocol else fs.unstrip_protocol(path)


def caption_and_meta(files: dict[str, bytes], captions: CaptionFiles) -> tuple[str | None, dict]:
    """The caption from a sample's `txt`/`json` files in the configured order, and its JSON fields."""
    meta: dict = {}
    if files.get("json") is not None:
        try:
            parsed = json.loads(files["json"])
            meta = parsed if isinstance(parsed, dict) else {}
        except (ValueError, UnicodeDecodeError):
            meta = {}
    for sidecar in captions.sidecars:
        if sidecar == "txt" and files.get("txt") is not None:
            text = files["txt"].decode("utf-8", errors="replace").strip()
            if text:
                return text, meta
        if sidecar == "json":
            for name in captions.json_fields:
                if isinstance(meta.get(name), str) and meta[name].strip():
                    return meta[name].strip(), meta
    return None, meta


def _carried(meta: dict, carry: list[str]) -> dict:
    return {c: meta[c] for c in carry if c in meta}


class ImageFolder:
    """Image files under a folder (nested), each with a caption from a mapping file, or from a
    `.txt` or `.json` file of the same name beside it."""

    def __init__(self, source: SourceConfig):
        self.source, self.opts = source, source.image_folder
        self.fs, self.root = fsspec.core.url_to_fs(source.path)
        self.root = self.root.rstrip("/")

    def _mapping(self) -> tuple[str | None, dict[str, str]]:
        if not self.opts.mapping:
            return None, {}
        import pandas as pd

        ref = self.opts.mapping
        if "://" in ref or os.path.isabs(ref):
            fs, path = fsspec.core.url_to_fs(ref)
        else:
            fs, path = self.fs, posixpath.join(self.root, ref)
        if not fs.exists(path):
            raise InputError(f"source.image_folder.mapping: {ref} not found")
        with fs.open(path, "rb") as f:
            if path.endswith(".parquet"):
                frame = pd.read_parquet(f)
            elif path.endswith((".jsonl", ".json")):
                frame = pd.read_json(f, lines=True)
            else:
                frame = pd.read_csv(f, dtype=str, keep_default_na=False)
        for column, key in ((self.opts.image_column, "image_column"), (self.opts.caption_column, "caption_column")):
            if column not in frame.columns:
                raise InputError(f"{ref}: no column {column!r} (set source.image_folder.{key}); "
                                 f"it has {', '.join(map(str, frame.columns))}")
        mapping = {}
        for image, caption in zip(frame[self.opts.image_column], frame[self.opts.caption_column]):
            rel = posixpath.normpath(str(image))
            mapping[rel] = caption.strip() if isinstance(caption, str) and caption.strip() else None
        return path, mapping

    def rows(self) -> list[dict]:
        if not self.fs.isdir(self.root):
            raise InputError(f"{self.source.path}: not a folder (source.kind is image_folder)")
        mapping_path, mapping = self._mapping()
        extensions = {e.lower().lstrip(".") for e in self.opts.extensions}
        groups: dict[str, dict[str, str]] = {}
        for path in self.fs.find(self.root):
            name = posixpath.basename(path)
            if path == mapping_path or name.startswith(".") or ".tmp-" in name:
                continue
            stem, ext = posixpath.splitext(path)
            groups.setdefault(stem, {})[ext.lower().lstrip(".")] = path
        rows = []

        def row(path, reason=None, **files):
            rows.append({"url": _full_url(self.fs, path), "image": files.get("image"), "txt": files.get("txt"),
                         "json": files.get("json"), "caption": files.get("caption"), "reason": reason})

        for stem in sorted(groups):
            files = groups[stem]
            images = sorted(e for e in files if e in extensions)
            for ext in images:
                rel = posixpath.relpath(files[ext], self.root)
                row(files[ext], image=files[ext], txt=files.get("txt"), json=files.get("json"),
                    caption=mapping.pop(rel, None))
            for ext in sorted(e for e in files if e not in extensions):
                if ext in ("txt", "json") and images:
                    continue
                row(files[ext], "missing_image" if ext in ("txt", "json") else "not_an_image")
        for rel in sorted(mapping):  # named by the mapping, not found in the folder
            row(posixpath.join(self.root, rel), "missing_image")
        return rows

    def shards(self, shard_size: int) -> Iterator[list[dict]]:
        rows = self.rows()
        for i, r in enumerate(rows):
            r["row_index"] = i
        for start in range(0, len(rows), shard_size):
            yield rows[start:start + shard_size]

    def samples(self, rows: list[dict]) -> Iterator[Sample]:
        carry = self.source.columns.carry

        def load(r: dict) -> Loaded:
            image = self.fs.cat_file(r["image"])
            sidecars = {e: self.fs.cat_file(r[e]) for e in ("txt", "json") if r[e]}
            caption, meta = caption_and_meta(sidecars, self.source.captions)
            return image, r["caption"] or caption, _carried(meta, carry)

        for r in rows:
            yield r["url"], r["row_index"], (lambda r=r: load(r))


class WebDatasetTars:
    """Tars of samples in the WebDataset layout ({key}.jpg + {key}.txt/.json), such as img2dataset's
    output. One input tar is one shard."""

    def __init__(self, source: SourceConfig):
        self.source = source

    def shards(self, shard_size: int) -> Iterator[list[dict]]:
        fs, files = list_files(self.source.path, (".tar",))
        for path in files:
            yield [{"tar": path}]

    def samples(self, rows: list[dict]) -> Iterator[Sample]:
        from webdataset.tariterators import group_by_keys, tar_file_iterator

        fs, _ = fsspec.core.url_to_fs(self.source.path)
        extensions = [e.lower().lstrip(".") for e in self.source.webdataset.extensions]
        carry = self.source.columns.carry
        for r in rows:
            url = _full_url(fs, r["tar"])
            with fs.open(r["tar"], "rb") as f:
                members = ({**m, "__url__": url} for m in tar_file_iterator(f))
                for sample in group_by_keys(members):
                    image = next((sample[e] for e in extensions if e in sample), None)
                    caption, meta = caption_and_meta(sample, self.source.captions)
                    origin = meta.get("url") if isinstance(meta.get("url"), str) else f"{url}#{sample['__key__']}"
                    loaded = (image, caption, _carried(meta, carry))
                    yield origin, -1, (lambda loaded=loaded: loaded)


class HfParquet:
    """Parquet as Hugging Face datasets writes it: an image column of {bytes, path} structs (or
    plain bytes) and a caption column. Shards are cut along row groups, read from the metadata."""

    def __init__(self, source: SourceConfig):
        self.source, self.opts = source, source.hf_parquet

    def _check(self, fs, path: str) -> list[str]:
        with fs.open(path, "rb") as f:
            schema = pq.read_schema(f)
        for column, key in ((self.opts.image_column, "image_column"), (self.opts.caption_column, "caption_column")):
            if column not in schema.names:
                raise InputError(f"{path}: no column {column!r} (set source.hf_parquet.{key}); "
                                 f"it has {', '.join(schema.names)}")
        kind = schema.field(self.opts.image_column).type
        if not (pa.types.is_binary(kind) or pa.types.is_large_binary(kind)
                or (pa.types.is_struct(kind) and kind.get_field_index("bytes") >= 0)):
            raise InputError(f"{path}: column {self.opts.image_column!r} is {kind}; hf_parquet needs image "
                             "bytes (a binary column, or a struct with a `bytes` field)")
        return [c for c in self.source.columns.carry if c in schema.names]

    def shards(self, shard_size: int) -> Iterator[list[dict]]:
        fs, files = list_files(self.source.path, (".parquet",))
        self._check(fs, files[0])
        part: list[dict] = []
        filled = row_index = 0
        for path in files:
            with fs.open(path, "rb") as f:
                meta = pq.ParquetFile(f).metadata
            for group in range(meta.num_row_groups):
                n, offset = meta.row_group(group).num_rows, 0
                while offset < n:
                    take = min(n - offset, shard_size - filled)
                    part.append({"file": path, "group": group, "offset": offset, "count": take, "row_index": row_index})
                    offset, filled, row_index = offset + take, filled + take, row_index + take
                    if filled == shard_size:
                        yield part
                        part, filled = [], 0
        if part:
            yield part

    def samples(self, rows: list[dict]) -> Iterator[Sample]:
        fs, _ = fsspec.core.url_to_fs(self.source.path)
        image_col, caption_col = self.opts.image_column, self.opts.caption_column
        for r in rows:
            carry = self._check(fs, r["file"])
            with fs.open(r["file"], "rb") as f:
                table = pq.ParquetFile(f).read_row_group(r["group"], columns=[image_col, caption_col, *carry])
            url = _full_url(fs, r["file"])
            for i, rec in enumerate(table.slice(r["offset"], r["count"]).to_pylist()):
                image = rec[image_col]
                image = image.get("bytes") if isinstance(image, dict) else image
                caption = rec[caption_col].strip() if isinstance(rec[caption_col], str) else None
                loaded = (image, caption or None, {c: rec[c] for c in carry})
                yield f"{url}#{r['row_index'] + i}", r["row_index"] + i, (lambda loaded=loaded: loaded)


KINDS = {"image_folder": ImageFolder, "webdataset": WebDatasetTars, "hf_parquet": HfParquet}


def reader_for(source: SourceConfig):
    if source.kind not in KINDS:
        raise InputError(f"source.kind {source.kind!r} is not read by the ingest stage")
    return KINDS[source.kind](source)


# Prepare ----------------------------------------------------------------------------------
def prepare(source: SourceConfig, cfg: DownloadConfig, store: ShardStore) -> list[str]:
    """List the input and cut it into input shards (once; a rerun reuses them)."""
    done = prepared_shards(store, source)
    if done is not None:
        return done
    shards, rows = [], {}
    for part in reader_for(source).shards(cfg.shard_size):
        name = shard_name(len(shards))
        store.write_table(pa.Table.from_pylist(part), INPUT, f"{name}.parquet")
        shards.append(name)
        rows[name] = len(part)
    if not shards:
        raise InputError(f"{source.path}: nothing to read (source.kind is {source.kind})")
    store.write_json({"shards": shards, "kind": source.kind, "path": source.path, "carried": [],
                      "rows_per_shard": rows}, INPUT, "_prepared.json")
    log.info("Cut the %s input into %d shards.", source.kind, len(shards))
    return shards


# One shard --------------------------------------------------------------------------------
_STATUS_FIELDS = [
    ("key", pa.string()), ("status", pa.string()), ("error_message", pa.string()),
    ("width", pa.int32()), ("height", pa.int32()), ("original_width", pa.int32()),
    ("original_height", pa.int32()), ("sha256", pa.string()),
]
_REJECTED_SCHEMA = pa.schema([("row_index", pa.int64()), ("url", pa.string()), ("reason", pa.string())])


def _load(sample: Sample) -> tuple[str, int, Loaded | Exception]:
    """Read one sample's files (on a thread: I/O only)."""
    url, row_index, load = sample
    try:
        return url, row_index, load()
    except Exception as e:  # noqa: BLE001 - one unreadable file is this sample's problem
        return url, row_index, e


def _check(url: str, row_index: int, loaded: Loaded | Exception, resizer) -> tuple[bytes | None, dict]:
    """Put a loaded sample's image through the resizer: (encoded image or None, metadata).

    In the calling thread only: img2dataset's resizer silences stdout and stderr around OpenCV
    by swapping file descriptors, which is not safe from several threads at once."""
    meta = {"url": url, "caption": None, "row_index": row_index}
    status = {name: None for name, _ in _STATUS_FIELDS}
    if isinstance(loaded, Exception):
        return None, {**meta, **status, "status": "failed_to_download",
                      "error_message": f"read error: {type(loaded).__name__}: {loaded}"[:500]}
    image, caption, carried = loaded
    meta = {**meta, "caption": caption, **{k: v for k, v in carried.items() if k not in meta and k not in status}}
    if image is None:
        return None, {**meta, **status, "status": "failed_to_download", "error_message": "missing image"}
    if not caption:
        return None, {**meta, **status, "status": "failed_to_download", "error_message": "missing caption"}
    img, width, height, original_width, original_height, error = resizer(io.BytesIO(image))
    if error is not None:
        return None, {**meta, **status, "status": "failed_to_resize", "error_message": error}
    return img, {**meta, **status, "status": "success", "width": width, "height": height,
                 "original_width": original_width, "original_height": original_height,
                 "sha256": hashlib.sha256(image).hexdigest()}


def _ordered_map(fn: Callable, items: Iterable, threads: int) -> Iterator:
    """fn over items on a thread pool, in order, with a bounded number in flight."""
    with ThreadPoolExecutor(max(1, threads)) as pool:
        window: deque = deque()
        for item in items:
            window.append(pool.submit(fn, item))
            if len(window) >= 2 * threads:
                yield window.popleft().result()
        while window:
            yield window.popleft().result()


def _status_table(rows: list[dict]) -> pa.Table:
    base = {"url": pa.string(), "caption": pa.string(), "row_index": pa.int64()}
    status = dict(_STATUS_FIELDS)
    carried = list(dict.fromkeys(k for r in rows for k in r if k not in base and k not in status))
    columns, fields = [], []
    for name in [*base, *carried, *status]:
        values = [r.get(name) for r in rows]
        kind = base.get(name) or status.get(name)
        try:
            array = pa.array(values, kind) if kind else pa.array(values)
        except (pa.ArrowInvalid, pa.ArrowTypeError):  # mixed types across samples: keep them as JSON
            array = pa.array([None if v is None else json.dumps(v) for v in values], pa.string())
        columns.append(array)
        fields.append(pa.field(name, array.type))
    return pa.Table.from_arrays(columns, schema=pa.schema(fields))


def ingest_shard(store: ShardStore, shard: str, source: SourceConfig, cfg: DownloadConfig) -> dict:
    """Read one input shard into download/{shard}.*; returns {rows_in, downloaded, dropped}."""
    import webdataset as wds
    from img2dataset.downloader import compute_key
    from img2dataset.logger import CappedCounter, write_stats

    from tessera.pipelines.imagecheck import resizer_for

    start = time.time()
    rows = store.read_table(INPUT, f"{shard}.parquet").to_pylist()
    rejected = [{"row_index": r.get("row_index"), "url": r.get("url"), "reason": r["reason"]}
                for r in rows if r.get("reason")]
    todo = [r for r in rows if not r.get("reason")]
    resizer = resizer_for(cfg)
    digits = math.ceil(math.log10(max(cfg.shard_size, 10)))
    status_rows: list[dict] = []
    errors = CappedCounter()
    workdir = tempfile.mkdtemp(prefix=f"tessera-ingest-{shard}-")
    try:
        with open(os.path.join(workdir, f"{shard}.tar"), "wb") as f, wds.TarWriter(f) as tar:
            loaded = _ordered_map(_load, reader_for(source).samples(todo), cfg.thread_count)
            for i, (img, meta) in enumerate(_check(*item, resizer) for item in loaded):
                if i >= 10 ** digits:
                    raise InputError(f"shard {shard} holds more than {10 ** digits} samples; set download.shard_size "
                                     "to at least the number of samples in the largest input tar")
                meta["key"] = compute_key(i, int(shard), digits, len(shard))
                if meta["row_index"] == -1:  # a tar member: its position in the input is its key
                    meta["row_index"] = int(meta["key"])
                errors.increment(meta["error_message"] or "success")
                if img is not None:
                    tar.write({"__key__": meta["key"], cfg.encode_format: img, "txt": meta["caption"],
                               "json": json.dumps(meta, indent=4, default=str)})
                status_rows.append(meta)
        pq.write_table(_status_table(status_rows), os.path.join(workdir, f"{shard}.parquet"))
        count = Counter(r["status"] for r in status_rows)
        write_stats(workdir, int(shard), len(status_rows), count["success"], count["failed_to_download"],
                    count["failed_to_resize"], start, time.time(), errors, len(shard))
        dropped = Counter(r["reason"] for r in rejected)
        dropped.update(reason_of(r["error_message"]) for r in status_rows if r["status"] != "success")
        store.write_table(pa.Table.from_pylist(rejected, schema=_REJECTED_SCHEMA), STAGE, f"{shard}_rejected.parquet")
        for suffix in (".tar", ".parquet", "_stats.json"):
            store.move_in(os.path.join(workdir, f"{shard}{suffix}"), STAGE, f"{shard}{suffix}")
        return {"rows_in": len(rejected) + len(status_rows), "downloaded": count["success"], "dropped": dict(dropped)}
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


# The stage --------------------------------------------------------------------------------
STEP = Stage(STAGE, inputs=(INPUT,), outputs=(STAGE,), work=ingest_shard, result=DownloadResult)


def run(source: SourceConfig, cfg: DownloadConfig, ray_cfg: RayConfig, store: ShardStore,
        on_shard=None) -> DownloadResult:
    """Read every input shard not yet done; return the download stage's counts over all shards."""
    from tessera.core import runtime
    from tessera.core.raytools import init_ray

    shards = prepare(source, cfg, store)
    if len(store.done_shards(STAGE)) < len(shards):
        init_ray(ray_cfg)
    ran = runtime.run_stage(STEP.name, store, shards, STEP.work, kwargs={"source": source, "cfg": cfg},
                            max_in_flight=cfg.max_tasks_in_flight, retries=cfg.shard_retries, on_shard=on_shard)
    prepared = store.read_json(INPUT, "_prepared.json")
    return summarize(store, shards, ran.failed, prepared.get("rows_per_shard"))
