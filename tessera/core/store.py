"""The shard store: one dataset root (a local path or an fsspec URL), stage folders under it.

A shard is done when its completion marker exists, and the marker is always written last. On a
filesystem with rename (local disk, memory://) a file is written under a temporary name and
renamed into place. Object stores (s3://, gs://, ...) have no rename: a file is written to a local
temporary file and uploaded whole, and an object becomes visible only when its upload completes.
Either way a crash never leaves a half file that looks finished, and a rerun redoes exactly the
shards without a marker.

Listings that decide what is done are always fresh: the store drops the filesystem's cached
listing of a folder before it lists it or asks whether a file exists, in the driver and in every
worker and actor (another process may have written there since).

A marker that cannot be read (empty after a crash or a full disk, cut short) counts as absent:
its shard is redone, and a warning names the file.
"""
from __future__ import annotations

import io
import json
import logging
import os
import posixpath
import tempfile
import uuid
from contextlib import contextmanager
from typing import TYPE_CHECKING, Iterator

import fsspec

if TYPE_CHECKING:
    import pyarrow as pa

from tessera.core.crashpoints import crash_point

log = logging.getLogger(__name__)

# Markers fetched at once by `markers` and `read_markers`.
MARKER_BATCH = 1000
# Filesystems that rename a file atomically; the others (object stores) get whole-object uploads.
RENAMING_PROTOCOLS = frozenset({"file", "local", "memory"})
# How long a presigned link to a report stays valid: a week, the longest S3 (SigV4) allows.
LINK_EXPIRES_S = 7 * 24 * 3600


def shard_name(index: int) -> str:
    """Shard names are zero-padded indices, as img2dataset writes them."""
    return f"{index:05d}"


class ShardStore:
    def __init__(self, root: str, storage_options: dict | None = None):
        """`storage_options` add to the process's fsspec defaults (the config's `storage`)."""
        self.root = root.rstrip("/")
        self.fs, self._base = fsspec.core.url_to_fs(self.root, **(storage_options or {}))
        self.protocol = self.fs.protocol if isinstance(self.fs.protocol, str) else self.fs.protocol[0]
        self.renames = self.protocol in RENAMING_PROTOCOLS

    def __repr__(self) -> str:
        return f"ShardStore({self.root!r})"

    def __reduce__(self):
        # Shipped to Ray workers by URL and the options the filesystem was opened with (endpoint,
        # region, ...), not by open handles: a worker reaches the same store as the driver.
        return (ShardStore, (self.root, dict(self.fs.storage_options)))

    # Paths --------------------------------------------------------------------------------
    def path(self, *parts: str) -> str:
        """The filesystem path (no protocol) of a file under the root, for self.fs."""
        return posixpath.join(self._base, *parts)

    def url(self, *parts: str) -> str:
        """The full URL of a file under the root, for libraries that take URLs."""
        return posixpath.join(self.root, *parts)

    def fresh(self, path: str) -> str:
        """Drop any cached listing of `path` and its folder, so that what follows asks the store."""
        self.fs.invalidate_cache(path)
        self.fs.invalidate_cache(posixpath.dirname(path.rstrip("/")))
        return path

    def exists(self, *parts: str) -> bool:
        return self.fs.exists(self.fresh(self.path(*parts)))

    def sync_folder(self, *parts: str) -> None:
        """Make the renames in a local folder durable (an object store has nothing to sync)."""
        if self.is_local:
            _fsync_folder(self.path(*parts))

    def makedirs(self, *parts: str) -> None:
        self.fs.makedirs(self.path(*parts), exist_ok=True)

    def _entries(self, folder: str) -> list[tuple[str, int | None]]:
        """The files of a folder as (name, size), from a fresh listing; [] when it is absent. A local
        folder is scanned directly: fsspec's detailed entries cost about 1 KB each, 150 MB of driver
        memory for a folder of 100,000 shards' markers and sidecars."""
        path = self.fresh(self.path(folder))
        try:
            if self.is_local:
                with os.scandir(path) as entries:
                    return [(e.name, _size(e)) for e in entries]
            return [(posixpath.basename(e["name"].rstrip("/")), e.get("size")) for e in self.fs.ls(path, detail=True)]
        except FileNotFoundError:
            return []

    def list(self, folder: str, suffix: str = "") -> list[str]:
        """Names (not paths) of the files in a stage folder, sorted."""
        return sorted(n for n, _ in self._entries(folder) if n.endswith(suffix) and ".tmp-" not in n)

    def sizes(self, folder: str) -> dict[str, int]:
        """Name -> size in bytes of the files in a folder, from one fresh listing."""
        return dict(self._entries(folder))

    # Atomic writes ------------------------------------------------------------------------
    @contextmanager
    def open_atomic(self, *parts: str, mode: str = "wb") -> Iterator[io.IOBase]:
        """A file that appears at its path whole, on success only. On a filesystem with rename it is
        written under a temporary name and renamed into place; on a local disk the file is fsynced
        before the rename and its folder after, so after a power cut it is there whole or not at
        all. On an object store it is written to a local file and uploaded whole."""
        final = self.path(*parts)
        if not self.renames:
            with tempfile.TemporaryDirectory(prefix="tessera-upload-") as tmpdir:
                local = os.path.join(tmpdir, posixpath.basename(final))
                with open(local, mode) as f:
                    yield f
                self.fs.put_file(local, final)
            self.fresh(final)
            return
        tmp = f"{final}.tmp-{uuid.uuid4().hex[:8]}"
        self.fs.makedirs(posixpath.dirname(final), exist_ok=True)
        try:
            with self.fs.open(tmp, mode) as f:
                yield f
                if self.is_local:
                    f.flush()
                    os.fsync(f.fileno())
            crash_point("mid_output", parts[0], posixpath.basename(final).split(".", 1)[0])
            self.fs.mv(tmp, final)
            if self.is_local:
                _fsync_folder(posixpath.dirname(final))
        except BaseException:
            if self.fs.exists(tmp):
                self.fs.rm(tmp)
            raise

    @property
    def is_local(self) -> bool:
        """Whether the store is on a local filesystem (not an object store or remote one)."""
        protocol = self.fs.protocol
        return bool({"file", "local"} & set([protocol] if isinstance(protocol, str) else protocol))

    def write_bytes(self, data: bytes, *parts: str) -> None:
        with self.open_atomic(*parts) as f:
            f.write(data)

    def write_json(self, obj, *parts: str) -> None:
        self.write_bytes(json.dumps(obj, indent=2, sort_keys=True, default=str).encode(), *parts)

    def read_json(self, *parts: str):
        with self.fs.open(self.path(*parts), "rb") as f:
            return json.load(f)

    def write_table(self, table: pa.Table, *parts: str) -> None:
        import pyarrow.parquet as pq  # heavy: only the stages that write tables load it

        with self.open_atomic(*parts) as f:
            pq.write_table(table, f)

    def read_table(self, *parts: str, columns: list[str] | None = None) -> pa.Table:
        import pyarrow.parquet as pq

        with self.fs.open(self.path(*parts), "rb") as f:
            return pq.read_table(f, columns=columns)

    def move_in(self, local_path: str, *parts: str) -> None:
        """Move a finished local file into the store, atomically at the target."""
        final = self.path(*parts)
        if not self.renames:  # one whole-object upload, visible when complete
            self.fs.put_file(local_path, final)
            self.fresh(final)
            return
        tmp = f"{final}.tmp-{uuid.uuid4().hex[:8]}"
        self.fs.makedirs(posixpath.dirname(final), exist_ok=True)
        self.fs.put_file(local_path, tmp)
        if self.is_local:
            _fsync_file(tmp)
        crash_point("mid_output", parts[0], posixpath.basename(final).split(".", 1)[0])
        self.fs.mv(tmp, final)
        if self.is_local:
            _fsync_folder(posixpath.dirname(final))

    # Completion markers -------------------------------------------------------------------
    def marker(self, stage: str, shard: str) -> tuple[str, str]:
        return stage, f"{shard}.done"

    def is_done(self, stage: str, shard: str) -> bool:
        return self.marker_info(stage, shard) is not None

    def mark_done(self, stage: str, shard: str, info: dict | None = None) -> None:
        """Write a shard's marker, last: its outputs are on disk before it (each fsynced when
        renamed into place), and a marker that survives a power cut is never empty."""
        self.write_json(info or {}, *self.marker(stage, shard))

    def done_info(self, stage: str, shard: str) -> dict:
        info = self.marker_info(stage, shard)
        if info is None:
            raise FileNotFoundError(f"{self.url(*self.marker(stage, shard))}: no readable completion marker")
        return info

    def marker_info(self, stage: str, shard: str) -> dict | None:
        """The marker's contents, or None when the shard is not done (or its marker is unreadable)."""
        path = self.fresh(self.path(*self.marker(stage, shard)))
        try:
            blob = self.fs.cat_file(path)
        except FileNotFoundError:
            return None
        return self._parse_marker(path, blob)

    def _parse_marker(self, path: str, blob: bytes) -> dict | None:
        try:
            info = json.loads(blob)
            if not isinstance(info, dict):
                raise ValueError(f"a JSON {type(info).__name__}, not an object")
            return info
        except ValueError as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            log.warning("Unreadable completion marker %s (%d bytes: %s): its shard counts as not done and is "
                        "redone.", self.fs.unstrip_protocol(path), len(blob), str(e).splitlines()[0][:120])
            return None

    def done_shards(self, stage: str) -> list[str]:
        """Shards with a non-empty marker (one listing; `markers` also reads them)."""
        return sorted(n[: -len(".done")] for n, size in self._entries(stage)
                      if n.endswith(".done") and ".tmp-" not in n and size != 0)

    def markers(self, stage: str, fields: tuple[str, ...] | None = None) -> dict[str, dict]:
        """Every done shard of a stage with its marker's contents (only `fields` of it, when given):
        one listing and batched reads (object stores fetch the files concurrently), not one
        request per shard in turn. Unreadable markers are left out, with a warning naming each."""
        shards = sorted(n[: -len(".done")] for n, _ in self._entries(stage) if n.endswith(".done") and ".tmp-" not in n)
        return self.read_markers(stage, shards, fields)

    def read_markers(self, stage: str, shards: list[str], fields: tuple[str, ...] | None = None) -> dict[str, dict]:
        """The markers of these shards (only `fields` of each, when given), read in batches of
        MARKER_BATCH concurrent fetches without listing the folder: the driver holds one batch of
        whole markers at a time. A shard whose marker is absent or unreadable is left out. Equal
        list and dict values are one shared object: read them, never change them in place."""
        self.fresh(self.path(stage))
        out = {}
        shared: dict[str, object] = {}  # equal lists and dicts (the score sources, a column list) held once
        for i in range(0, len(shards), MARKER_BATCH):
            batch = shards[i:i + MARKER_BATCH]
            paths = [self.path(*self.marker(stage, s)) for s in batch]
            blobs = self.fs.cat(paths, on_error="omit")
            for shard, path in zip(batch, paths):
                info = self._parse_marker(path, blobs[path]) if path in blobs else None
                if info is not None:
                    kept = info if fields is None else {k: info[k] for k in fields if k in info}
                    out[shard] = {k: shared.setdefault(json.dumps(v, sort_keys=True), v)
                                  if isinstance(v, (list, dict)) else v for k, v in kept.items()}
        return out

    def clear_temporaries(self, stage: str) -> int:
        """Remove temporaries a crashed run left behind; returns how many."""
        stale = [self.path(stage, n) for n, _ in self._entries(stage) if ".tmp-" in n]
        for p in stale:
            self.fs.rm(p, recursive=True)
        return len(stale)


def _size(entry: os.DirEntry) -> int | None:
    try:
        return entry.stat().st_size
    except OSError:  # a link to nothing
        return None


def viewable_link(url: str, expires_s: int = LINK_EXPIRES_S) -> str:
    """A link a person can open in a browser: a presigned HTTPS URL for a file on an object store,
    a file:// URL for a local path, and the URL itself for anything else (a folder, memory://, a
    store that cannot sign, such as GCS with user credentials)."""
    fs, path = fsspec.core.url_to_fs(url)
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    if protocol in ("file", "local"):
        return f"file://{os.path.abspath(path)}"
    if protocol in RENAMING_PROTOCOLS or not fs.isfile(path):
        return url
    try:
        return fs.sign(path, expiration=expires_s)
    except (NotImplementedError, ValueError, AttributeError, OSError) as e:
        log.warning("Cannot presign %s (%s); linking the object's URL instead.", url, e)
        return url


def _fsync_file(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_folder(path: str) -> None:
    """Make the renames in a local folder durable."""
    _fsync_file(path)
