"""The download stage: input parquet -> img2dataset WebDataset shards, one Ray task per shard.

1. `prepare` cuts the input into shards of `shard_size` rows on Ray (`download/_input/{shard}.parquet`,
   column names mapped) and finds duplicate URLs by hash partition (tessera/pipelines/prepare.py);
   the driver reads only the input files' footers.
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
import shutil
import tempfile
from collections import Counter

import pyarrow as pa
import pyarrow.parquet as pq

from tessera.config.download import DownloadConfig, SourceConfig
from tessera.config.ray import RayConfig
from tessera.core import runtime
from tessera.core.raytools import init_ray
from tessera.core.stage import Stage
from tessera.core.store import ShardStore
from tessera.core.urlcheck import check_url, install_guard
from tessera.pipelines import prepare as cut
from tessera.pipelines.imagecheck import SafeResizer
from tessera.pipelines.intake import (INPUT, STAGE, DownloadResult, InputError, clean_caption, drop_damaged,
                                      list_files, prepared_shards, reason_for, shard_record, summarize)

log = logging.getLogger(__name__)


def prepare(source: SourceConfig, cfg: DownloadConfig, store: ShardStore, ray_cfg: RayConfig) -> list[str]:
    """Cut a laion_parquet input into shards on Ray and find its duplicate URLs (once; a rerun
    reuses them, and finishes what an interrupted one left). Returns the shard names."""
    shards = prepared_shards(store, source)
    if shards is not None:
        return shards
    fs, files = list_files(source.path, (".parquet",))
    schema = pq.read_schema(fs.open(files[0], "rb"))
    for need, key in ((source.columns.url, "url"), (source.columns.caption, "caption")):
        if need not in schema.names:
            raise InputError(f"{files[0]}: no column {need!r} (set source.columns.{key})")
    carried = [c for c in source.columns.carry if c in schema.names]
    missing = [c for c in source.columns.carry if c not in schema.names]
    if missing:
        log.info("The input has no %s column(s); they are not carried.", ", ".join(missing))
    rows = cut.file_rows(fs, files)
    plan = cut.plan_shards(files, rows, cfg.shard_size)
    shards = list(plan)
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    parts = cut.partitions_for(sum(rows))
    init_ray(ray_cfg)
    limits = {"retries": cfg.shard_retries, "max_in_flight": cfg.max_tasks_in_flight, "unit": "rows"}
    cutting = runtime.run_stage(INPUT, store, shards, cut.cut_shard,
                                kwargs={"columns": source.columns, "carried": carried, "protocol": protocol,
                                        "parts": parts},
                                shard_kwargs=lambda shard: {"plan": plan[shard]}, **limits)
    deduplicating = runtime.run_stage(
        cut.DEDUP, store, [f"{p:04d}" for p in range(parts)], cut.find_duplicates, outputs=(cut.DUPLICATES,),
        kwargs={"shards": shards, "parts": parts}, **limits)
    failed = {**cutting.failed, **deduplicating.failed}
    if failed:
        raise InputError(f"the input could not be cut into shards ({len(failed)} failed; run again to retry "
                         f"them): " + "; ".join(f"{k}: {v}" for k, v in sorted(failed.items())[:5]))
    store.write_json({"shards": shards, "rows": sum(rows),
                      "rows_per_shard": {s: min(cfg.shard_size, sum(rows) - plan[s]["first"]) for s in shards},
                      "files": files, "carried": carried, "kind": source.kind}, INPUT, "_prepared.json")
    log.info("Cut %d input rows into %d shards of up to %d.", sum(rows), len(shards), cfg.shard_size)
    return shards


# One shard ------------------------------------------------------------------------------
def download_shard(store: ShardStore, name: str, cfg: DownloadConfig, carried: list[str]) -> dict:
    """Download one input shard into `download/`; returns the shard's counts."""
    from img2dataset.downloader import Downloader
    from img2dataset.writer import WebDatasetSampleWriter

    install_guard(cfg.urls, proxy=cfg.proxy, max_body_bytes=cfg.max_image_bytes)
    rows = store.read_table(INPUT, f"{name}.parquet").to_pylist()
    duplicates = cut.duplicate_rows(store, rows[0]["row_index"], rows[-1]["row_index"]) if rows else set()
    accepted, rejected, repaired = [], [], Counter()
    for row in rows:
        caption = clean_caption(row.pop("caption_bytes"), cfg.caption_limits)
        reason = "duplicate_url" if row["row_index"] in duplicates else check_url(row["url"], cfg.urls)
        if reason or caption.dropped:
            rejected.append({"row_index": row["row_index"], "url": row["url"], "reason": reason or caption.dropped})
        else:
            row["caption"] = caption.text or ""
            repaired.update(caption.repairs)
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
            "repaired": dict(repaired),
        }
        info.update(shard_record(out, name))
        store.write_table(pa.Table.from_pylist(rejected, schema=_REJECTED_SCHEMA), STAGE, f"{name}_rejected.parquet")
        for suffix in (".tar", ".parquet", "_stats.json"):
            store.move_in(os.path.join(out, f"{name}{suffix}"), STAGE, f"{name}{suffix}")
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
    """Download every shard of a laion_parquet input not yet done; return the stage's counts."""
    shards = prepare(source, cfg, store, ray_cfg)
    prepared = store.read_json(INPUT, "_prepared.json")
    drop_damaged(store, shards)
    if len(store.done_shards(STAGE)) < len(shards):
        init_ray(ray_cfg)
    ran = runtime.run_stage(STEP.name, store, shards, STEP.work,
                            kwargs={"cfg": cfg, "carried": prepared["carried"]},
                            max_in_flight=cfg.max_tasks_in_flight, retries=cfg.shard_retries, on_shard=on_shard)
    return summarize(store, shards, ran.failed, prepared.get("rows_per_shard"))


STEP = Stage(STAGE, inputs=(INPUT,), outputs=(STAGE,), work=download_shard, result=DownloadResult)
