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
import re
import shutil
import tarfile
import tempfile
from collections import Counter
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.parquet as pq

from tessera.config.download import DownloadConfig, SourceConfig
from tessera.config.ray import RayConfig
from tessera.core.funnel import DROPPED, StageResult, by_reason
from tessera.core.stage import Stage
from tessera.core.store import ShardStore
from tessera.core.urlcheck import check_url
from tessera.pipelines.prepare import INPUT, duplicate_rows

log = logging.getLogger(__name__)
STAGE = "download"
KEPT = "downloaded"


class InputError(ValueError):
    """The input parquet cannot be used as configured."""


@dataclass
class DownloadResult(StageResult):
    rows_in: int
    downloaded: int
    dropped: dict[str, int]
    shards: int

    def outcomes(self) -> list[tuple[str, str, str, int]]:
        return [(STAGE, KEPT, "", self.downloaded), *by_reason(STAGE, DROPPED, self.dropped)]


# Reasons ----------------------------------------------------------------------------------
_REASONS = [
    # Refused while under way (urlcheck.BlockedAddress): a blocked address or a refused redirect.
    (re.compile(r"(?:^|urlopen error )(blocked_\w+|bad_scheme|url_too_long|malformed_url|empty_url): "), None),
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


def prepared_shards(store: ShardStore, source: SourceConfig) -> list[str] | None:
    """The shards an earlier run cut the input into (None when it was not cut yet); an input of
    another kind than the store was prepared from is an error."""
    if not store.exists(INPUT, "_prepared.json"):
        return None
    prepared = store.read_json(INPUT, "_prepared.json")
    kind = prepared.get("kind", "laion_parquet")
    if kind != source.kind:
        raise InputError(f"{store.url(INPUT)} was prepared from a {kind} source, not {source.kind}: "
                         "use a new data_root")
    return prepared["shards"]


def prepare(source: SourceConfig, cfg: DownloadConfig, store: ShardStore, ray_cfg: RayConfig) -> list[str]:
    """Cut the input into shards on Ray and find its duplicate URLs (once; a rerun reuses them, and
    finishes what an interrupted one left). Returns the shard names."""
    from tessera.core import runtime
    from tessera.core.raytools import init_ray
    from tessera.pipelines import prepare as cut

    if source.kind != "laion_parquet":  # read, not downloaded
        from tessera.pipelines import ingest

        return ingest.prepare(source, cfg, store)
    shards = prepared_shards(store, source)
    if shards is not None:
        return shards
    fs, files = _input_files(source.path)
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
                                kwargs={"columns": source.columns, "carried": carried, "protocol": protocol},
                                shard_kwargs=lambda shard: {"plan": plan[shard]}, **limits)
    deduplicating = runtime.run_stage(
        cut.DEDUP, store, [f"{p:04d}" for p in range(parts)], cut.find_duplicates, outputs=(cut.DUPLICATES,),
        kwargs={"shards": shards, "firsts": [plan[s]["first"] for s in shards], "parts": parts}, **limits)
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
def _decode_caption(raw: bytes | None) -> str:
    return "" if raw is None else raw.decode("utf-8", errors="replace")


def download_shard(store: ShardStore, name: str, cfg: DownloadConfig, carried: list[str]) -> dict:
    """Download one input shard into `download/`; returns the shard's counts."""
    from img2dataset.downloader import Downloader
    from img2dataset.writer import WebDatasetSampleWriter

    from tessera.core.urlcheck import install_guard
    from tessera.pipelines.imagecheck import SafeResizer

    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    install_guard(cfg.urls, proxy=cfg.proxy)
    rows = store.read_table(INPUT, f"{name}.parquet").to_pylist()
    duplicates = duplicate_rows(store, rows[0]["row_index"], rows[-1]["row_index"]) if rows else set()
    accepted, rejected = [], []
    for row in rows:
        reason = "duplicate_url" if row["row_index"] in duplicates else check_url(row["url"], cfg.urls)
        if reason:
            rejected.append({"row_index": row["row_index"], "url": row["url"], "reason": reason})
        else:
            row["caption"] = _decode_caption(row.pop("caption_bytes"))
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
        return info
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


_REJECTED_SCHEMA = pa.schema([("row_index", pa.int64()), ("url", pa.string()), ("reason", pa.string())])


def _accepted_schema(rows: list[dict], carried: list[str]) -> pa.Schema:
    sample = pa.Table.from_pylist(rows[:1])
    fields = [pa.field("url", pa.string()), pa.field("caption", pa.string()), pa.field("row_index", pa.int64())]
    return pa.schema(fields + [sample.schema.field(c) for c in carried])


# Reading a finished shard ----------------------------------------------------------------------
def read_samples(store: ShardStore, shard: str, wanted: set[str] | None = None) -> dict[str, dict[str, bytes]]:
    """The files of a download tar by sample, {key: {ext: bytes}}: every sample, or the wanted keys.
    An unreadable tar is an error naming the shard (the stage runtime records the shard as failed)."""
    members: dict[str, dict[str, bytes]] = {}
    try:
        with store.fs.open(store.path(STAGE, f"{shard}.tar"), "rb") as f, tarfile.open(fileobj=f, mode="r|") as tar:
            for member in tar:
                key, _, ext = member.name.rpartition("/")[2].partition(".")
                if member.isfile() and (wanted is None or key in wanted):
                    members.setdefault(key, {})[ext] = tar.extractfile(member).read()
    except (OSError, tarfile.TarError, EOFError) as e:
        raise RuntimeError(f"{store.url(STAGE, shard + '.tar')} cannot be read ({e}); remove "
                           f"download/{shard}.done to download that shard again") from e
    return members


# The stage --------------------------------------------------------------------------------
def run(source: SourceConfig, cfg: DownloadConfig, ray_cfg: RayConfig, store: ShardStore,
        on_shard=None) -> DownloadResult:
    """Download every shard not yet done; return the stage's counts over all shards."""
    if source.kind != "laion_parquet":  # read, not downloaded
        from tessera.pipelines import ingest

        return ingest.run(source, cfg, ray_cfg, store, on_shard)
    from tessera.core import runtime
    from tessera.core.raytools import init_ray

    shards = prepare(source, cfg, store, ray_cfg)
    prepared = store.read_json(INPUT, "_prepared.json")
    if len(store.done_shards(STAGE)) < len(shards):
        init_ray(ray_cfg)
    ran = runtime.run_stage(STEP.name, store, shards, STEP.work,
                            kwargs={"cfg": cfg, "carried": prepared["carried"]},
                            max_in_flight=cfg.max_tasks_in_flight, retries=cfg.shard_retries, on_shard=on_shard)
    return summarize(store, shards, ran.failed, prepared.get("rows_per_shard"))


STEP = Stage(STAGE, inputs=(INPUT,), outputs=(STAGE,), work=download_shard, result=DownloadResult)


def summarize(store: ShardStore, shards: list[str], failed: dict[str, str],
              rows_per_shard: dict[str, int] | None = None) -> DownloadResult:
    markers = store.markers(STAGE)
    infos = [markers[s] for s in shards if s not in failed]
    dropped: Counter = Counter()
    for info in infos:
        dropped.update(info["dropped"])
    lost = sum((rows_per_shard or {}).get(s, 0) for s in failed)
    return DownloadResult(
        rows_in=sum(i["rows_in"] for i in infos) + lost,
        downloaded=sum(i["downloaded"] for i in infos),
        dropped=dict(dropped),
        shards=len(infos),
        failed=failed,
        failed_rows=lost,
    )
