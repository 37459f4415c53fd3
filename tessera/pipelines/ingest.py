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
from tessera.core import runtime
from tessera.core.raytools import init_ray
from tessera.core.stage import Stage
from tessera.core.store import ShardStore, shard_name
from tessera.core.tars import TarProblem, split_name, tar_members
from tessera.pipelines.imagecheck import resizer_for
from tessera.pipelines.intake import (INPUT, STAGE, DownloadResult, InputError, clean_caption, drop_damaged, full_url,
                                      list_files, prepared_shards, reason_for, shard_record, summarize)

log = logging.getLogger(__name__)

# A sample to read: where it came from, its input position, and how to load
# (image bytes or None, raw caption or None, carried metadata).
Loaded = tuple[bytes | None, bytes | str | None, dict]
Sample = tuple[str, int, Callable[[], Loaded]]


class Refused(Exception):
    """A sample refused while read; the message starts with the drop reason."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


def caption_and_meta(files: dict[str, bytes], captions: CaptionFiles) -> tuple[bytes | str | None, dict]:
    """The raw caption from a sample's `txt`/`json` files in the configured order, and its JSON
    fields. The caption is checked and decoded later, by `intake.clean_caption`."""
    meta: dict = {}
    if files.get("json") is not None:
        try:
            parsed = json.loads(files["json"])
            meta = parsed if isinstance(parsed, dict) else {}
        except (ValueError, UnicodeDecodeError):
            meta = {}
    for sidecar in captions.sidecars:
        if sidecar == "txt" and files.get("txt") is not None and files["txt"].strip():
            return files["txt"], meta
        if sidecar == "json":
            for name in captions.json_fields:
                if isinstance(meta.get(name), str) and meta[name].strip():
                    return meta[name], meta
    return None, meta


def _carried(meta: dict, carry: list[str]) -> dict:
    return {c: meta[c] for c in carry if c in meta}


class ImageFolder:
    """Image files under a folder (nested), each with a caption from a mapping file, or from a
    `.txt` or `.json` file of the same name beside it. Symlinked folders are followed, each real
    folder once (a link back to a folder already listed is not followed again)."""

    def __init__(self, source: SourceConfig, cfg: DownloadConfig):
        self.source, self.opts, self.cfg = source, source.image_folder, cfg
        self.fs, self.root = fsspec.core.url_to_fs(source.path)
        self.root = self.root.rstrip("/") or "/"

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

    def _files(self) -> list[str]:
        """Every file under the root; on a local disk through symlinked folders, each real folder once."""
        if "file" not in self.fs.protocol and "local" not in self.fs.protocol:
            return self.fs.find(self.root)
        seen, files = set(), []
        for folder, subfolders, names in os.walk(self.root, followlinks=True):
            real = os.stat(folder)
            if (real.st_dev, real.st_ino) in seen:  # a second way into a folder already listed
                log.info("%s leads to a folder already listed; not listed again.", folder)
                subfolders[:] = []
                continue
            seen.add((real.st_dev, real.st_ino))
            files += [posixpath.join(folder, n) for n in names]
        return sorted(files)

    def rows(self) -> list[dict]:
        if not self.fs.isdir(self.root):
            raise InputError(f"{self.source.path}: not a folder (source.kind is image_folder)")
        mapping_path, mapping = self._mapping()
        extensions = {e.lower().lstrip(".") for e in self.opts.extensions}
        groups: dict[str, dict[str, str]] = {}
        for path in self._files():
            name = posixpath.basename(path)
            if path == mapping_path or name.startswith(".") or ".tmp-" in name:
                continue
            stem, ext = posixpath.splitext(path)
            groups.setdefault(stem, {})[ext.lower().lstrip(".")] = path
        rows = []

        def row(path, reason=None, **files):
            rows.append({"url": full_url(self.fs, path), "image": files.get("image"), "txt": files.get("txt"),
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

    def samples_in(self, part: list[dict]) -> int:
        return len(part)

    def shards(self) -> Iterator[list[dict]]:
        rows = self.rows()
        for i, r in enumerate(rows):
            r["row_index"] = i
        for start in range(0, len(rows), self.cfg.shard_size):
            yield rows[start:start + self.cfg.shard_size]

    def _read(self, path: str) -> bytes:
        """A file's bytes, its size checked before it is read."""
        size = self.fs.size(path)
        if size is not None and size > self.cfg.max_image_bytes:
            raise Refused("too_large", f"{path} holds {size} bytes (download.max_image_bytes is "
                                       f"{self.cfg.max_image_bytes})")
        return self.fs.cat_file(path)

    def samples(self, rows: list[dict]) -> Iterator[Sample]:
        carry = self.source.columns.carry

        def load(r: dict) -> Loaded:
            image = self._read(r["image"])
            sidecars = {e: self._read(r[e]) for e in ("txt", "json") if r[e]}
            caption, meta = caption_and_meta(sidecars, self.source.captions)
            return image, r["caption"] or caption, _carried(meta, carry)

        for r in rows:
            yield r["url"], r["row_index"], (lambda r=r: load(r))


class WebDatasetTars:
    """Tars of samples in the WebDataset layout ({key}.jpg + {key}.txt/.json), such as img2dataset's
    output. One input tar is one shard; its samples are counted while listing (headers only).

    Members over `download.max_image_bytes` and sparse members drop their sample (`too_large`,
    `sparse_member`). A tar cut short keeps every sample before the cut; the sample the cut
    falls in is recorded as `truncated_tar`, and a tar that is no tar as one `corrupt_tar` row."""

    def __init__(self, source: SourceConfig, cfg: DownloadConfig):
        self.source, self.cfg = source, cfg

    def shards(self) -> Iterator[list[dict]]:
        fs, files = list_files(self.source.path, (".tar",))
        for path in files:
            yield [{"tar": path, "samples": self._count(fs, path)}]

    def samples_in(self, part: list[dict]) -> int:
        return sum(r["samples"] for r in part)

    def _count(self, fs, path: str) -> int:
        """Samples in a tar, from its headers: the rows `samples` will give (in a cut tar, the
        sample the cut falls in is one; a tar cut before its first member is one)."""
        keys, last = 0, None
        try:
            with fs.open(path, "rb") as f:
                for member in tar_members(f, full_url(fs, path), self.cfg.max_image_bytes, wanted=lambda _: False):
                    key = split_name(member.name)[0]
                    keys, last = keys + (key != last), key
        except TarProblem:
            keys = max(keys, 1)
        return keys

    def _grouped(self, fs, path: str, url: str) -> Iterator[tuple[str, dict[str, bytes], str | None]]:
        """(key, {ext: bytes}, refusal reason or None) per sample, in tar order; a cut or corrupt
        tar ends with one (key, {}, problem) for the sample the cut falls in. A sample is known
        complete once the next one starts: a cut in a header takes the sample before it along."""
        key, files, refused = None, {}, None
        try:
            with fs.open(path, "rb") as f:
                for member in tar_members(f, url, self.cfg.max_image_bytes):
                    name_key, ext = split_name(member.name)
                    if name_key != key:
                        if key is not None:
                            yield key, files, refused
                        key, files, refused = name_key, {}, None
                    refused = refused or member.refused
                    if member.data is not None:
                        files[ext] = member.data
        except TarProblem as e:
            cut_key = split_name(e.member)[0] if e.member else None
            if key is not None and cut_key is not None and cut_key != key:
                yield key, files, refused
                key = cut_key
            yield key or cut_key or "(start)", {}, str(e)
            return
        if key is not None:
            yield key, files, refused

    def samples(self, rows: list[dict]) -> Iterator[Sample]:
        fs, _ = fsspec.core.url_to_fs(self.source.path)
        extensions = [e.lower().lstrip(".") for e in self.source.webdataset.extensions]
        carry = self.source.columns.carry
        for r in rows:
            url = full_url(fs, r["tar"])
            for key, files, problem in self._grouped(fs, r["tar"], url):
                if problem:
                    reason, _, detail = problem.partition(": ")
                    error = Refused(reason, detail or f"{url}#{key}")
                    yield f"{url}#{key}", -1, (lambda error=error: _raise(error))
                    continue
                image = next((files[e] for e in extensions if e in files), None)
                caption, meta = caption_and_meta(files, self.source.captions)
                origin = meta.get("url") if isinstance(meta.get("url"), str) else f"{url}#{key}"
                loaded = (image, caption, _carried(meta, carry))
                yield origin, -1, (lambda loaded=loaded: loaded)


def _raise(error: Exception):
    raise error


class HfParquet:
    """Parquet as Hugging Face datasets writes it: an image column of {bytes, path} structs (or
    plain bytes) and a caption column. Shards are planned along row groups from the metadata; a
    shard reads its slice a row at a time and stops at its end. Memory is bounded by the largest
    data page read (a page can hold a whole row group: see `max_row_group_bytes`)."""

    def __init__(self, source: SourceConfig, cfg: DownloadConfig):
        self.source, self.opts, self.cfg = source, source.hf_parquet, cfg

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

    def shards(self) -> Iterator[list[dict]]:
        shard_size = self.cfg.shard_size
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

    def samples_in(self, part: list[dict]) -> int:
        return sum(r["count"] for r in part)

    def _rows(self, fs, r: dict, columns: list[str]) -> Iterator[dict]:
        """The rows of one slice of a row group, read a few at a time."""
        with fs.open(r["file"], "rb") as f:
            skip, left = r["offset"], r["count"]
            for batch in pq.ParquetFile(f).iter_batches(1, row_groups=[r["group"]], columns=columns):
                if skip >= len(batch):
                    skip -= len(batch)
                    continue
                batch = batch.slice(skip, left)
                skip, left = 0, left - len(batch)
                for i in range(len(batch)):
                    yield batch.slice(i, 1).to_pylist()[0]
                if left == 0:
                    return

    @staticmethod
    def _group_bytes(fs, r: dict, columns: list[str]) -> int:
        with fs.open(r["file"], "rb") as f:
            group = pq.ParquetFile(f).metadata.row_group(r["group"])
        chunks = (group.column(i) for i in range(group.num_columns))
        return sum(c.total_uncompressed_size for c in chunks if c.path_in_schema.split(".")[0] in columns)

    @staticmethod
    def _refused(url: str, r: dict, start: int, error: Exception) -> Iterator[Sample]:
        for j in range(start, r["count"]):
            yield f"{url}#{r['row_index'] + j}", r["row_index"] + j, (lambda: _raise(error))

    def samples(self, rows: list[dict]) -> Iterator[Sample]:
        fs, _ = fsspec.core.url_to_fs(self.source.path)
        image_col, caption_col = self.opts.image_column, self.opts.caption_column
        for r in rows:
            carry = self._check(fs, r["file"])
            url = full_url(fs, r["file"])
            columns = [image_col, caption_col, *carry]
            size = self._group_bytes(fs, r, columns)
            if size > self.opts.max_row_group_bytes:
                error = Refused("row_group_too_large", f"{url}: row group {r['group']} reads {size} bytes "
                                f"(source.hf_parquet.max_row_group_bytes is {self.opts.max_row_group_bytes})")
                yield from self._refused(url, r, 0, error)
                continue
            rows = self._rows(fs, r, columns)
            for i in range(r["count"]):
                try:
                    rec = next(rows)
                except (OSError, pa.ArrowException, StopIteration) as e:  # the rest of this slice is unreadable
                    error = Refused("read_error", f"{url}: row group {r['group']}: {type(e).__name__}: {e}")
                    yield from self._refused(url, r, i, error)
                    break
                image = rec[image_col]
                image = image.get("bytes") if isinstance(image, dict) else image
                caption = rec[caption_col] if isinstance(rec[caption_col], str) else None
                loaded = (image, caption, {c: rec[c] for c in carry})
                yield f"{url}#{r['row_index'] + i}", r["row_index"] + i, (lambda loaded=loaded: loaded)


KINDS = {"image_folder": ImageFolder, "webdataset": WebDatasetTars, "hf_parquet": HfParquet}


def reader_for(source: SourceConfig, cfg: DownloadConfig):
    if source.kind not in KINDS:
        raise InputError(f"source.kind {source.kind!r} is not read by the ingest stage")
    return KINDS[source.kind](source, cfg)


# Prepare ----------------------------------------------------------------------------------
def prepare(source: SourceConfig, cfg: DownloadConfig, store: ShardStore) -> list[str]:
    """List the input and cut it into input shards (once; a rerun reuses them)."""
    done = prepared_shards(store, source)
    if done is not None:
        return done
    shards, rows = [], {}
    reader = reader_for(source, cfg)
    for part in reader.shards():
        name = shard_name(len(shards))
        store.write_table(pa.Table.from_pylist(part), INPUT, f"{name}.parquet")
        shards.append(name)
        rows[name] = reader.samples_in(part)
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


def _check(url: str, row_index: int, loaded: Loaded | Exception, resizer,
           cfg: DownloadConfig) -> tuple[bytes | None, dict, tuple[str, ...]]:
    """Put a loaded sample's image through the resizer: (encoded image or None, metadata, the
    caption's repairs).

    In the calling thread only: img2dataset's resizer silences stdout and stderr around OpenCV
    by swapping file descriptors, which is not safe from several threads at once."""
    meta = {"url": url, "caption": None, "row_index": row_index}
    status = {name: None for name, _ in _STATUS_FIELDS}

    def failed(message: str, how: str = "failed_to_download"):
        return None, {**meta, **status, "status": how, "error_message": message[:500]}, ()

    if isinstance(loaded, Exception):
        reason = getattr(loaded, "reason", None)
        return failed(str(loaded) if reason else f"read error: {type(loaded).__name__}: {loaded}")
    image, raw_caption, carried = loaded
    caption = clean_caption(raw_caption, cfg.caption_limits)
    meta = {**meta, "caption": caption.text,
            **{k: v for k, v in carried.items() if k not in meta and k not in status}}
    if image is None:
        return failed("missing image")
    if len(image) > cfg.max_image_bytes:
        return failed(f"too_large: {len(image)} bytes (download.max_image_bytes is {cfg.max_image_bytes})")
    if caption.dropped:
        return failed(f"{caption.dropped}: the caption is over {cfg.caption_limits.max_bytes} bytes"
                      if caption.dropped == "caption_too_long" else f"{caption.dropped}: not UTF-8")
    if not caption.text:
        return failed("missing caption")
    img, width, height, original_width, original_height, error = resizer(io.BytesIO(image))
    if error is not None:
        return failed(error, "failed_to_resize")
    return img, {**meta, **status, "status": "success", "width": width, "height": height,
                 "original_width": original_width, "original_height": original_height,
                 "sha256": hashlib.sha256(image).hexdigest()}, caption.repairs


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

    start = time.time()
    rows = store.read_table(INPUT, f"{shard}.parquet").to_pylist()
    rejected = [{"row_index": r.get("row_index"), "url": r.get("url"), "reason": r["reason"]}
                for r in rows if r.get("reason")]
    todo = [r for r in rows if not r.get("reason")]
    resizer = resizer_for(cfg)
    digits = math.ceil(math.log10(max(cfg.shard_size, 10)))
    status_rows: list[dict] = []
    repaired: Counter = Counter()
    errors = CappedCounter()
    workdir = tempfile.mkdtemp(prefix=f"tessera-ingest-{shard}-")
    try:
        with open(os.path.join(workdir, f"{shard}.tar"), "wb") as f, wds.TarWriter(f) as tar:
            loaded = _ordered_map(_load, reader_for(source, cfg).samples(todo), cfg.thread_count)
            for i, (img, meta, repairs) in enumerate(_check(*item, resizer, cfg) for item in loaded):
                if i >= 10 ** digits:
                    inputs = ", ".join(sorted({r.get("tar") or r.get("file") or r.get("url") or "" for r in todo}))
                    raise InputError(f"shard {shard} ({inputs}) holds more than {10 ** digits} samples; set "
                                     "download.shard_size to at least the number of samples in the largest input tar")
                meta["key"] = compute_key(i, int(shard), digits, len(shard))
                if meta["row_index"] == -1:  # a tar member: its position in the input is its key
                    meta["row_index"] = int(meta["key"])
                errors.increment(meta["error_message"] or "success")
                repaired.update(repairs)
                if img is not None:
                    tar.write({"__key__": meta["key"], cfg.encode_format: img, "txt": meta["caption"],
                               "json": json.dumps(meta, indent=4, default=str)})
                status_rows.append(meta)
        pq.write_table(_status_table(status_rows), os.path.join(workdir, f"{shard}.parquet"))
        count = Counter(r["status"] for r in status_rows)
        write_stats(workdir, int(shard), len(status_rows), count["success"], count["failed_to_download"],
                    count["failed_to_resize"], start, time.time(), errors, len(shard))
        dropped = Counter(r["reason"] for r in rejected)
        dropped.update(reason_for(r["error_message"]) for r in status_rows if r["status"] != "success")
        record = shard_record(workdir, shard)
        store.write_table(pa.Table.from_pylist(rejected, schema=_REJECTED_SCHEMA), STAGE, f"{shard}_rejected.parquet")
        for suffix in (".tar", ".parquet", "_stats.json"):
            store.move_in(os.path.join(workdir, f"{shard}{suffix}"), STAGE, f"{shard}{suffix}")
        return {"rows_in": len(rejected) + len(status_rows), "downloaded": count["success"], "dropped": dict(dropped),
                "repaired": dict(repaired), **record}
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


# The stage --------------------------------------------------------------------------------
STEP = Stage(STAGE, inputs=(INPUT,), outputs=(STAGE,), work=ingest_shard, result=DownloadResult)


def run(source: SourceConfig, cfg: DownloadConfig, ray_cfg: RayConfig, store: ShardStore,
        on_shard=None) -> DownloadResult:
    """Read every input shard not yet done; return the download stage's counts over all shards."""
    shards = prepare(source, cfg, store)
    drop_damaged(store, shards)
    if len(store.done_shards(STAGE)) < len(shards):
        init_ray(ray_cfg)
    ran = runtime.run_stage(STEP.name, store, shards, STEP.work, kwargs={"source": source, "cfg": cfg},
                            max_in_flight=cfg.max_tasks_in_flight, retries=cfg.shard_retries, on_shard=on_shard)
    prepared = store.read_json(INPUT, "_prepared.json")
    return summarize(store, shards, ran.failed, prepared.get("rows_per_shard"))
