"""The shard store: one dataset root (a local path or an fsspec URL), stage folders under it.

A shard file is written under a temporary name and renamed into place; a shard is done when
its completion marker exists, and the marker is always written last. A crash therefore never
leaves a half shard that looks done, and a rerun redoes exactly the shards without a marker.
"""
from __future__ import annotations

import io
import json
import os
import posixpath
import uuid
from contextlib import contextmanager
from typing import TYPE_CHECKING, Iterator

import fsspec

if TYPE_CHECKING:
    import pyarrow as pa

from tessera.core.crashpoints import crash_point


def shard_name(index: int) -> str:
    """Shard names are zero-padded indices, as img2dataset writes them."""
    return f"{index:05d}"


class ShardStore:
    def __init__(self, root: str):
        self.root = root.rstrip("/")
        self.fs, self._base = fsspec.core.url_to_fs(self.root)
        self.protocol = self.fs.protocol if isinstance(self.fs.protocol, str) else self.fs.protocol[0]

    def __repr__(self) -> str:
        return f"ShardStore({self.root!r})"

    def __reduce__(self):  # ship to Ray workers by URL, not by open handles
        return (ShardStore, (self.root,))

    # Paths --------------------------------------------------------------------------------
    def path(self, *parts: str) -> str:
        """The filesystem path (no protocol) of a file under the root, for self.fs."""
        return posixpath.join(self._base, *parts)

    def url(self, *parts: str) -> str:
        """The full URL of a file under the root, for libraries that take URLs."""
        return posixpath.join(self.root, *parts)

    def exists(self, *parts: str) -> bool:
        return self.fs.exists(self.path(*parts))

    def makedirs(self, *parts: str) -> None:
        self.fs.makedirs(self.path(*parts), exist_ok=True)

    def list(self, folder: str, suffix: str = "") -> list[str]:
        """Names (not paths) of the files in a stage folder, sorted."""
        if not self.exists(folder):
            return []
        names = [posixpath.basename(p.rstrip("/")) for p in self.fs.ls(self.path(folder), detail=False)]
        return sorted(n for n in names if n.endswith(suffix) and ".tmp-" not in n)

    # Atomic writes ------------------------------------------------------------------------
    @contextmanager
    def open_atomic(self, *parts: str, mode: str = "wb") -> Iterator[io.IOBase]:
        """Write to a temporary name next to the target, rename into place on success only. On a
        local disk the file is fsynced before the rename and its folder after: after a power cut
        the file is there whole or not at all. (Object stores write whole objects.)"""
        final = self.path(*parts)
        tmp = f"{final}.tmp-{uuid.uuid4().hex[:8]}"
        self.fs.makedirs(posixpath.dirname(final), exist_ok=True)
        try:
            with self.fs.open(tmp, mode) as f:
                yield f
                if self._local:
                    f.flush()
                    os.fsync(f.fileno())
            crash_point("mid_output", parts[0], posixpath.basename(final).split(".", 1)[0])
            self.fs.mv(tmp, final)
            if self._local:
                _fsync_folder(posixpath.dirname(final))
        except BaseException:
            if self.fs.exists(tmp):
                self.fs.rm(tmp)
            raise

    @property
    def _local(self) -> bool:
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
        tmp = f"{final}.tmp-{uuid.uuid4().hex[:8]}"
        self.fs.makedirs(posixpath.dirname(final), exist_ok=True)
        self.fs.put_file(local_path, tmp)
        if self._local:
            _fsync_file(tmp)
        crash_point("mid_output", parts[0], posixpath.basename(final).split(".", 1)[0])
        self.fs.mv(tmp, final)
        if self._local:
            _fsync_folder(posixpath.dirname(final))

    # Completion markers -------------------------------------------------------------------
    def marker(self, stage: str, shard: str) -> tuple[str, str]:
        return stage, f"{shard}.done"

    def is_done(self, stage: str, shard: str) -> bool:
        return self.exists(*self.marker(stage, shard))

    def mark_done(self, stage: str, shard: str, info: dict | None = None) -> None:
        """Write a shard's marker, last: its outputs are on disk before it (each fsynced when
        renamed into place), and a marker that survives a power cut is never empty."""
        self.write_json(info or {}, *self.marker(stage, shard))

    def done_info(self, stage: str, shard: str) -> dict:
        return self.read_json(*self.marker(stage, shard))

    def marker_info(self, stage: str, shard: str) -> dict | None:
        """The marker's contents, or None when the shard is not done."""
        return self.done_info(stage, shard) if self.is_done(stage, shard) else None

    def done_shards(self, stage: str) -> list[str]:
        return [n[: -len(".done")] for n in self.list(stage, ".done")]

    def markers(self, stage: str) -> dict[str, dict]:
        """Every done shard of a stage with its marker's contents: one listing and one batched
        read (object stores fetch the files concurrently), not one request per shard in turn."""
        shards = self.done_shards(stage)
        if not shards:
            return {}
        paths = [self.path(*self.marker(stage, s)) for s in shards]
        blobs = self.fs.cat(paths, on_error="omit")
        return {s: json.loads(blobs[p]) for s, p in zip(shards, paths) if p in blobs}

    def clear_temporaries(self, stage: str) -> int:
        """Remove temporaries a crashed run left behind; returns how many."""
        if not self.exists(stage):
            return 0
        stale = [p for p in self.fs.ls(self.path(stage), detail=False) if ".tmp-" in posixpath.basename(p)]
        for p in stale:
            self.fs.rm(p, recursive=True)
        return len(stale)


def _fsync_file(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_folder(path: str) -> None:
    """Make the renames in a local folder durable."""
    _fsync_file(path)
