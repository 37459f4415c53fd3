"""The download stage: input parquet -> img2dataset WebDataset shards, one Ray task per shard.

1. `prepare` reads the input once in the driver: maps column names, marks duplicate URLs, and
   cuts it into input shards of `shard_size` rows (`download/_input/{shard}.parquet`).
2. One Ray task per input shard: the URL check drops what must not be fetched, img2dataset's
   Downloader fetches the rest through the guarded opener, and the shard's files are moved into
   `download/` with the completion marker last. Tasks are retried and bounded in flight.

Every input row ends in exactly one place: in img2dataset's `{shard}.parquet` (downloaded, or
failed with its error) or in `{shard}_rejected.parquet` (refused before download). Each row's
`row_index` (its position in the input) rides along for lineage.
"""
from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
from collections import Counter
from dataclasses import dataclass

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from tessera.config.download import ColumnMap, DownloadConfig, SourceConfig
from tessera.config.ray import RayConfig
from tessera.pipelines.store import ShardStore, shard_name
from tessera.pipelines.urlcheck import check_url

log = logging.getLogger(__name__)
STAGE = "download"
INPUT = "download/_input"
KEPT = "downloaded"


class InputError(ValueError):
    """The input parquet cannot be used as configured."""


@dataclass
class DownloadResult:
    rows_in: int
    downloaded: int
    dropped: dict[str, int]
    shards: int

    def funnel(self) -> list[dict]:
        rows = [{"stage": STAGE, "outcome": KEPT, "reason": "", "count": self.downloaded}]
        rows += [{"stage": STAGE, "outcome": "dropped", "reason": r, "count": n}
                 for r, n in sorted(self.dropped.items())]
        return rows


# Reasons ----------------------------------------------------------------------------------
_REASONS = [
    (re.compile(r"(blocked_\w+)"), None),
    (re.compile(r"HTTP Error 30\d: .*infinite loop", re.S), "redirect_loop"),
    (re.compile(r"HTTP Error 30\d: .*redirection to url .* is not allowed", re.S | re.I), "bad_scheme"),
    (re.compile(r"HTTP Error (\d{3})"), "http_{}"),
    (re.compile(r"timed out|timeout", re.I), "timeout"),
    (re.compile(r"X-Robots-Tag"), "disallowed_by_site"),
    (re.compile(r"Name or service not known|nodename nor servname|getaddrinfo|Temporary failure in name"), "dns_error"),
    (re.compile(r"Connection refused|Connection reset|Network is unreachable|Remote end closed"), "connection_error"),
    (re.compile(r"^empty image"), "empty_image"),
    (re.compile(r"^not an image|Image decoding error"), "not_an_image"),
    (re.compile(r"^corrupt image"), "corrupt_image"),
    (re.compile(r"^decompression bomb"), "decompression_bomb"),
    (re.compile(r"image too small"), "image_too_small"),
    (re.compile(r"aspect ratio too large"), "aspect_ratio"),
    (re.compile(r"image area too large"), "decompression_bomb"),
    (re.compile(r"hash mismatch"), "hash_mismatch"),
]


def reason_for(error_message: str | None) -> str:
    """Map img2dataset's free-text error to one of our drop reasons."""
    msg = error_message or ""
    for pattern, template in _REASONS:
        m = pattern.search(msg)
        if m:
            return m.group(1) if template is None else template.format(*m.groups())
    return "download_error"


# Prepare ----------------------------------------------------------------------------------
def _input_files(store_fs_url: str) -> tuple[object, list[str]]:
    import fsspec

    fs, path = fsspec.core.url_to_fs(store_fs_url)
    if any(c in path for c in "*?["):
        files = sorted(fs.glob(path))
    elif fs.isdir(path):
        files = sorted(p for p in fs.find(path) if p.endswith(".parquet"))
    else:
        files = [path] if fs.exists(path) else []
    if not files:
        raise InputError(f"no input parquet found at {store_fs_url}")
    return fs, files


def _normalise(batch: pa.RecordBatch, columns: ColumnMap, present: list[str]) -> pa.Table:
    """Rename to url/caption (captions as bytes: crawled text is not always UTF-8)."""
    names = batch.schema.names
    caption = batch.column(names.index(columns.caption))
    if pa.types.is_string(caption.type) or pa.types.is_large_string(caption.type):
        caption = caption.view(pa.binary() if pa.types.is_string(caption.type) else pa.large_binary())
    data = {
        "url": batch.column(names.index(columns.url)).cast(pa.string()),
        "caption_bytes": caption.cast(pa.binary()),
    }
    for col in present:
        data[col] = batch.column(names.index(col))
    return pa.table(data)


def _duplicate_mask(dataset: pads.Dataset, url_column: str) -> np.ndarray:
    """True for every row whose non-empty URL already appeared in an earlier row.

    One pass over the URL column only, 8 bytes of hash per row, and a single sort."""
    digests = [
        pd.util.hash_pandas_object(b.column(0).to_pandas().fillna(""), index=False).to_numpy(np.uint64)
        for b in dataset.to_batches(columns=[url_column], batch_size=262_144)
    ]
    digests = np.concatenate(digests) if digests else np.empty(0, np.uint64)
    first = np.zeros(len(digests), dtype=bool)
    first[np.unique(digests, return_index=True)[1]] = True
    empty = pd.util.hash_pandas_object(pd.Series([""]), index=False).to_numpy(np.uint64)[0]
    return ~first & (digests != empty)


def prepare(source: SourceConfig, cfg: DownloadConfig, store: ShardStore) -> list[str]:
    """Cut the input into shards (once; a rerun reuses them). Returns the shard names."""
    if source.kind != "laion_parquet":  # read, not downloaded
        from tessera.pipelines import ingest

        return ingest.prepare(source, cfg, store)
    if store.exists(INPUT, "_prepared.json"):
        return store.read_json(INPUT, "_prepared.json")["shards"]
    fs, files = _input_files(source.path)
    schema = pq.read_schema(fs.open(files[0], "rb"))
    for need, key in ((source.columns.url, "url"), (source.columns.caption, "caption")):
        if need not in schema.names:
            raise InputError(f"{files[0]}: no column {need!r} (set source.columns.{key})")
    present = [c for c in source.columns.carry if c in schema.names]
    missing = [c for c in source.columns.carry if c not in schema.names]
    if missing:
        log.info("The input has no %s column(s); they are not carried.", ", ".join(missing))
    # Copies of LAION differ in numeric types (WIDTH is int64 in some, float64 in others).
    schema = pa.schema([
        f.with_type(pa.float64()) if f.name in present and f.name != "hash"
        and (pa.types.is_integer(f.type) or pa.types.is_floating(f.type)) else f
        for f in schema
    ])
    dataset = pads.dataset(files, schema=schema, filesystem=fs, format="parquet")
    duplicate = _duplicate_mask(dataset, source.columns.url)
    shards: list[str] = []
    pending: list[pa.Table] = []
    pending_rows = row_index = 0

    def flush(final: bool) -> None:
        nonlocal pending, pending_rows
        table = pa.concat_tables(pending) if pending else None
        while table is not None and (table.num_rows >= cfg.shard_size or (final and table.num_rows)):
            name = shard_name(len(shards))
            store.write_table(table.slice(0, cfg.shard_size), INPUT, f"{name}.parquet")
            shards.append(name)
            table = table.slice(cfg.shard_size)
        pending = [table] if table is not None and table.num_rows else []
        pending_rows = table.num_rows if table is not None else 0

    cols = [source.columns.url, source.columns.caption, *present]
    for batch in dataset.to_batches(columns=cols, batch_size=65_536):
        table = _normalise(batch, source.columns, present)
        n = table.num_rows
        table = table.append_column("row_index", pa.array(np.arange(row_index, row_index + n), pa.int64()))
        table = table.append_column("duplicate", pa.array(duplicate[row_index:row_index + n]))
        row_index += n
        pending.append(table)
        pending_rows += n
        if pending_rows >= cfg.shard_size:
            flush(final=False)
    flush(final=True)
    store.write_json({"shards": shards, "rows": row_index, "files": files, "carried": present},
                     INPUT, "_prepared.json")
    log.info("Cut %d input rows into %d shards of up to %d.", row_index, len(shards), cfg.shard_size)
    return shards


# One shard ------------------------------------------------------------------------------
def _decode_caption(raw: bytes | None) -> str:
    return "" if raw is None else raw.decode("utf-8", errors="replace")


def download_shard(name: str, cfg: DownloadConfig, store: ShardStore, carried: list[str]) -> dict:
    """Download one input shard into `download/`. Safe to call again: a done shard is skipped."""
    if store.is_done(STAGE, name):
        return store.done_info(STAGE, name)
    from img2dataset.downloader import Downloader
    from img2dataset.writer import WebDatasetSampleWriter

    from tessera.pipelines.imagecheck import SafeResizer
    from tessera.pipelines.urlcheck import install_guard

    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    install_guard(cfg.urls)
    rows = store.read_table(INPUT, f"{name}.parquet").to_pylist()
    accepted, rejected = [], []
    for row in rows:
        reason = "duplicate_url" if row["duplicate"] else check_url(row["url"], cfg.urls)
        if reason:
            rejected.append({"row_index": row["row_index"], "url": row["url"], "reason": reason})
        else:
            row["caption"] = _decode_caption(row.pop("caption_bytes"))
            row.pop("duplicate")
            accepted.append(row)

    columns = ["url", "caption", "row_index", *carried]
    workdir = tempfile.mkdtemp(prefix=f"tessera-download-{name}-")
    try:
        feather = os.path.join(workdir, "input.feather")
        table = pa.Table.from_pylist(accepted, schema=_accepted_schema(rows, carried)) if accepted \
            else pa.table({c: pa.array([], pa.string()) for c in columns})
        with pa.OSFile(feather, "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
            writer.write_table(table)
        out = os.path.join(workdir, "out")
        os.makedirs(out)
        downloader = Downloader(
            sample_writer_class=WebDatasetSampleWriter,
            resizer=SafeResizer(
                image_size=cfg.image_size, resize_mode=cfg.resize_mode,
                resize_only_if_bigger=cfg.resize_only_if_bigger, encode_quality=cfg.encode_quality,
                encode_format=cfg.encode_format, min_image_size=cfg.min_image_size,
                max_image_area=cfg.max_image_area, max_aspect_ratio=cfg.max_aspect_ratio,
            ),
            thread_count=cfg.thread_count, save_caption=True, extract_exif=False,
            output_folder=out, column_list=columns, timeout=cfg.timeout,
            number_sample_per_shard=max(cfg.shard_size, 10), oom_shard_count=len(name),
            compute_hash="sha256", verify_hash_type=None, encode_format=cfg.encode_format,
            retries=cfg.retries, user_agent_token=cfg.user_agent_token,
            disallowed_header_directives=cfg.disallowed_header_directives,
        )
        # Raise instead of img2dataset's print-and-continue, so that Ray retries the shard.
        downloader.download_shard((int(name), feather))
        status = pq.read_table(os.path.join(out, f"{name}.parquet"),
                               columns=["status", "error_message"]).to_pylist()
        if len(status) != len(accepted):
            raise RuntimeError(f"img2dataset wrote {len(status)} status rows for {len(accepted)} URLs")
        reasons = Counter(r["reason"] for r in rejected)
        reasons.update(reason_for(s["error_message"]) for s in status if s["status"] != "success")
        info = {
            "rows_in": len(rows),
            "downloaded": sum(s["status"] == "success" for s in status),
            "dropped": dict(reasons),
        }
        store.write_table(pa.Table.from_pylist(rejected, schema=_REJECTED_SCHEMA), STAGE, f"{name}_rejected.parquet")
        for suffix in (".tar", ".parquet", "_stats.json"):
            store.move_in(os.path.join(out, f"{name}{suffix}"), STAGE, f"{name}{suffix}")
        store.mark_done(STAGE, name, info)
        return info
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


_REJECTED_SCHEMA = pa.schema([("row_index", pa.int64()), ("url", pa.string()), ("reason", pa.string())])


def _accepted_schema(rows: list[dict], carried: list[str]) -> pa.Schema:
    sample = pa.Table.from_pylist(rows[:1])
    fields = [pa.field("url", pa.string()), pa.field("caption", pa.string()), pa.field("row_index", pa.int64())]
    return pa.schema(fields + [sample.schema.field(c) for c in carried])


# The stage --------------------------------------------------------------------------------
def run(source: SourceConfig, cfg: DownloadConfig, ray_cfg: RayConfig, store: ShardStore,
        on_shard=None) -> DownloadResult:
    """Download every shard not yet done; return the stage's counts over all shards."""
    if source.kind != "laion_parquet":  # read, not downloaded
        from tessera.pipelines import ingest

        return ingest.run(source, cfg, ray_cfg, store, on_shard)
    from tessera.pipelines.raytools import init_ray, run_shards

    shards = prepare(source, cfg, store)
    carried = store.read_json(INPUT, "_prepared.json")["carried"]
    removed = store.clear_temporaries(STAGE)
    if removed:
        log.info("Removed %d temporary file(s) left by an interrupted run.", removed)
    todo = [s for s in shards if not store.is_done(STAGE, s)]
    log.info("Download: %d of %d shards to do (%d already done).", len(todo), len(shards), len(shards) - len(todo))
    if todo:
        init_ray(ray_cfg)
        run_shards(STAGE, download_shard, [(s, (s, cfg, store, carried)) for s in todo],
                   max_in_flight=cfg.max_tasks_in_flight, retries=cfg.task_retries, on_result=on_shard)
    return summarize(store, shards)


def summarize(store: ShardStore, shards: list[str]) -> DownloadResult:
    infos = [store.done_info(STAGE, s) for s in shards]
    dropped: Counter = Counter()
    for info in infos:
        dropped.update(info["dropped"])
    return DownloadResult(
        rows_in=sum(i["rows_in"] for i in infos),
        downloaded=sum(i["downloaded"] for i in infos),
        dropped=dict(dropped),
        shards=len(shards),
    )
