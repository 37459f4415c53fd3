"""What every source reader shares: the download stage's names, its result and drop reasons, the
listing of input files, and the reading of the shards it leaves.

A laion_parquet source is downloaded (tessera/pipelines/download.py); the other kinds are read
(tessera/pipelines/ingest.py). Both write the same `download/{shard}.*` outputs and report in the
same vocabulary, defined here; tessera/pipelines/sources.py picks the reader by `source.kind`.
"""
from __future__ import annotations

import hashlib
import logging
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import NamedTuple

import fsspec
import pyarrow.parquet as pq

from tessera.config.download import CaptionLimits, SourceConfig
from tessera.core.funnel import DROPPED, StageResult, by_reason
from tessera.core.store import ShardStore
from tessera.core.tars import MAX_OWN_MEMBER_BYTES, TarProblem, tar_members
from tessera.pipelines.prepare import INPUT

log = logging.getLogger(__name__)
STAGE = "download"
KEPT = "downloaded"


class InputError(ValueError):
    """The input cannot be used as configured."""


@dataclass
class DownloadResult(StageResult):
    rows_in: int
    downloaded: int
    dropped: dict[str, int]
    shards: int
    # Captions kept after a repair, by kind (`caption_cut`, `caption_encoding`); not in the funnel.
    repaired: dict[str, int] = field(default_factory=dict)

    def outcomes(self) -> list[tuple[str, str, str, int]]:
        return [(STAGE, KEPT, "", self.downloaded), *by_reason(STAGE, DROPPED, self.dropped)]


def summarize(store: ShardStore, shards: list[str], failed: dict[str, str],
              rows_per_shard: dict[str, int] | None = None) -> DownloadResult:
    """The stage's counts over all shards; a failed shard counts the rows its input shard holds."""
    markers = store.markers(STAGE)
    infos = [markers[s] for s in shards if s not in failed]
    dropped: Counter = Counter()
    repaired: Counter = Counter()
    for info in infos:
        dropped.update(info["dropped"])
        repaired.update(info.get("repaired", {}))
    lost = sum((rows_per_shard or {}).get(s, 0) for s in failed)
    return DownloadResult(
        rows_in=sum(i["rows_in"] for i in infos) + lost,
        downloaded=sum(i["downloaded"] for i in infos),
        dropped=dict(dropped),
        shards=len(infos),
        failed=failed,
        failed_rows=lost,
        repaired=dict(repaired),
    )


# Reasons ----------------------------------------------------------------------------------
# Errors raised by our own readers and guards: the message starts with the reason.
OWN_REASONS = ("too_large", "row_group_too_large", "truncated_tar", "corrupt_tar", "sparse_member",
               "caption_too_long", "bad_caption_encoding", "read_error")
_REASONS = [
    (re.compile(r"^(" + "|".join(OWN_REASONS) + r"): "), None),
    (re.compile(r"^missing caption"), "missing_caption"),
    (re.compile(r"^missing image"), "missing_image"),
    (re.compile(r"^read error"), "read_error"),
    # Refused while under way (urlcheck): a blocked address, a refused redirect, a body over the cap.
    (re.compile(r"(?:^|urlopen error )(blocked_\w+|bad_scheme|url_too_long|malformed_url|empty_url|too_large): "),
     None),
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
    """The drop reason for a sample's error message (img2dataset's free text, or our own)."""
    msg = error_message or ""
    for pattern, template in _REASONS:
        m = pattern.search(msg)
        if m:
            return m.group(1) if template is None else template.format(*m.groups())
    return "download_error"


# Captions ---------------------------------------------------------------------------------
class Caption(NamedTuple):
    text: str | None  # None: no caption (missing, blank or dropped)
    dropped: str | None = None  # the drop reason
    repairs: tuple[str, ...] = ()


def clean_caption(raw: bytes | str | None, limits: CaptionLimits) -> Caption:
    """A caption as it enters: at most `limits.max_bytes` of valid UTF-8, stripped, or the reason
    it is dropped. Over-long captions are cut (or dropped) before they are decoded whole."""
    if raw is None:
        return Caption(None)
    repairs: list[str] = []
    data = raw.encode("utf-8", "surrogatepass") if isinstance(raw, str) else bytes(raw)
    cut = len(data) > limits.max_bytes
    if cut:
        if limits.too_long == "drop":
            return Caption(None, "caption_too_long")
        data = data[:limits.max_bytes]
        repairs.append("caption_cut")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        if cut and e.reason == "unexpected end of data":  # the cut split a character
            text = data[:e.start].decode("utf-8")
        elif limits.bad_encoding == "drop":
            return Caption(None, "bad_caption_encoding")
        else:
            text = data.decode("utf-8", "replace")
            repairs.append("caption_encoding")
    text = text.strip()
    return Caption(text or None, None, tuple(repairs))


# Input ------------------------------------------------------------------------------------
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


def full_url(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """A path as the user would write it: plain for local files, with its protocol otherwise."""
    return path if "file" in fs.protocol or "local" in fs.protocol else fs.unstrip_protocol(path)


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


# Reading a finished shard ----------------------------------------------------------------------
def read_samples(store: ShardStore, shard: str, wanted: set[str] | None = None,
                 max_member_bytes: int = MAX_OWN_MEMBER_BYTES) -> dict[str, dict[str, bytes]]:
    """The files of a download tar by sample, {key: {ext: bytes}}: every sample, or the wanted keys.
    An unreadable tar, or a member over `max_member_bytes`, is an error naming the shard (the
    stage runtime records the shard as failed)."""
    members: dict[str, dict[str, bytes]] = {}
    url = store.url(STAGE, shard + ".tar")
    try:
        with store.fs.open(store.path(STAGE, f"{shard}.tar"), "rb") as f:
            for member in tar_members(f, url, max_member_bytes,
                                      wanted=None if wanted is None else (lambda n: _key(n) in wanted)):
                if member.refused:
                    raise TarProblem(member.refused, f"{url}: member {member.name}: {member.refused}")
                if member.data is not None:
                    members.setdefault(_key(member.name), {})[member.name.rpartition("/")[2].partition(".")[2]] = \
                        member.data
    except (OSError, TarProblem) as e:
        raise RuntimeError(f"{url} cannot be read ({e}); remove download/{shard}.done to download that "
                           "shard again") from e
    return members


def _key(name: str) -> str:
    return name.rpartition("/")[2].partition(".")[0]


def shard_record(folder: str, name: str) -> dict:
    """What a finished shard in a local folder holds, for its marker: `fingerprint`, a digest of
    every sample's key, status and image hash (a shard downloaded again with other bytes gets
    another one, so the stages after it redo that shard), and `tar_bytes`, the tar's size (a tar
    cut short, even at a member boundary, no longer matches it), and `columns`, the columns of its
    parquet (what a later stage can read from it, known without opening the file)."""
    status = pq.read_table(os.path.join(folder, f"{name}.parquet"))
    columns = [c for c in ("key", "status", "sha256") if c in status.column_names]
    h = hashlib.sha256()
    rows = sorted(tuple("" if v is None else str(v) for v in row)
                  for row in zip(*(status.column(c).to_pylist() for c in columns)))  # written in any order
    for row in rows:
        h.update("\x1f".join(row).encode() + b"\x1e")
    return {"fingerprint": h.hexdigest()[:16], "tar_bytes": os.path.getsize(os.path.join(folder, f"{name}.tar")),
            "columns": sorted(status.column_names)}


def drop_damaged(store: ShardStore, shards: list[str]) -> list[str]:
    """Remove the markers of done shards whose tar is missing or not the size its marker recorded
    (cut short by a crash or a copy), so that they are downloaded again. Returns those shards."""
    markers = store.markers(STAGE)
    sizes = store.sizes(STAGE)
    damaged = []
    for shard in shards:
        expected = markers.get(shard, {}).get("tar_bytes")
        if expected is not None and sizes.get(f"{shard}.tar") != expected:
            log.warning("%s holds %s bytes, its marker says %d: the shard is downloaded again.",
                        store.url(STAGE, f"{shard}.tar"), sizes.get(f"{shard}.tar", "no"), expected)
            store.fs.rm(store.path(*store.marker(STAGE, shard)))
            damaged.append(shard)
    return damaged
