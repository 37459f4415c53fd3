"""One writer per data_root: a run holds a lease, `{data_root}/_lease.json`, while it writes.

The lease names its holder (owner, host, pid, start) and carries a heartbeat that a thread of the
holder renews every `stale_after_s / 4` seconds. A second run finds the lease and refuses with one
line naming the holder, or waits for it with `wait=True`. A lease whose heartbeat is older than
`stale_after_s` belongs to a run that died: it is taken over, with a warning.

What is guaranteed where:
- Taking a free lease is exclusive everywhere: an exclusive create (`O_EXCL` on local disk; on
  S3 a conditional PutObject, `If-None-Match: *`, which AWS S3, MinIO, R2 and moto implement).
- On S3, taking over a stale lease and renewing one are conditional on the ETag last read
  (`If-Match`): of two runs that find the same stale lease, one wins and the other sees it held.
- Elsewhere (local disk, memory://, stores without conditional writes) a takeover renames the
  stale lease aside (atomic on local disk, one of two takers fails) and creates a new one
  exclusively; a holder that finds its lease taken by another run on its next heartbeat stops
  renewing it and `check()` raises, so the loser stops at its next stage instead of writing on.
"""
from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass

from tessera.core.store import ShardStore

log = logging.getLogger(__name__)
LEASE = "_lease.json"


def _parse(blob: bytes):
    try:
        return json.loads(blob)
    except ValueError:
        return None


class LeaseHeld(RuntimeError):
    """Another run holds the lease of this data_root."""


class LeaseLost(RuntimeError):
    """This run's lease was taken over by another run (its heartbeat had stopped for too long)."""


def describe(info: dict) -> str:
    beat = time.time() - float(info.get("heartbeat", 0))
    return (f"{info.get('owner', '?')} (host {info.get('host', '?')}, pid {info.get('pid', '?')}, started "
            f"{time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime(float(info.get('start', 0))))}, "
            f"last heartbeat {beat:.0f} s ago)")


def active_holder(store: ShardStore, stale_after_s: float) -> str | None:
    """Who holds the data_root's live lease (None when it is free or stale), without taking it."""
    seen = Lease(store, "")._read()
    if seen is None or seen.info is None:
        return None
    return describe(seen.info) if time.time() - float(seen.info.get("heartbeat", 0)) <= stale_after_s else None


@dataclass
class _Seen:
    info: dict | None  # None: unreadable (being written, or damaged)
    etag: str | None


class Lease:
    """`with Lease(store, owner):` holds the data_root's lease for the block."""

    def __init__(self, store: ShardStore, owner: str, stale_after_s: float = 300.0, wait: bool = False,
                 poll_s: float | None = None):
        self.store, self.owner, self.stale_after_s, self.wait = store, owner, stale_after_s, wait
        self.poll_s = poll_s if poll_s is not None else min(30.0, stale_after_s / 4)
        self.path = store.path(LEASE)
        self.info: dict | None = None
        self.etag: str | None = None
        self.lost: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    # The lease file ----------------------------------------------------------------------------
    def _new_info(self) -> dict:
        now = time.time()
        start = self.info["start"] if self.info else now
        token = self.info["token"] if self.info else uuid.uuid4().hex
        return {"owner": self.owner, "host": socket.gethostname(), "pid": os.getpid(), "start": start,
                "heartbeat": now, "token": token}

    def _read(self) -> _Seen | None:
        """The lease as it is now, with its ETag on S3 (read in one go: a read raises if the
        object changes under it)."""
        fs = self.store.fs
        self.store.fresh(self.path)
        try:
            with fs.open(self.path, "rb") as f:
                etag = getattr(f, "details", {}).get("ETag")
                blob = f.read()
        except FileNotFoundError:
            return None
        try:
            info = json.loads(blob)
            return _Seen(info if isinstance(info, dict) else None, etag)
        except ValueError:
            return _Seen(None, etag)

    def _create(self, info: dict) -> bool:
        """Exclusive create; False when a lease exists."""
        try:
            self.store.fs.pipe_file(self.path, json.dumps(info).encode(), mode="create")
        except FileExistsError:
            return False
        self._remember(info)
        return True

    def _remember(self, info: dict) -> None:
        self.info = info
        seen = self._read()
        self.etag = seen.etag if seen else None

    def _replace(self, seen: _Seen, info: dict, takeover: bool) -> bool:
        """Overwrite the lease that was read as `seen`, only if it is still that one (see the
        module doc for how sure that is on each kind of store)."""
        fs, data = self.store.fs, json.dumps(info).encode()
        if self.store.protocol in ("s3", "s3a") and seen.etag:
            bucket, key, _ = fs.split_path(self.path)
            try:
                fs.call_s3("put_object", Bucket=bucket, Key=key, Body=data, IfMatch=seen.etag)
            except (OSError, FileNotFoundError) as e:  # s3fs turns a failed precondition into OSError
                if isinstance(e, FileNotFoundError) or "condition" in str(e).lower() or "412" in str(e):
                    return False
                raise
            self.store.fresh(self.path)
            self._remember(info)
            return True
        if not takeover:  # a renewal: one atomic overwrite, the lease never disappears
            self.store.write_bytes(data, LEASE)
            self._remember(info)
            return True
        aside = f"{self.path}.stale-{uuid.uuid4().hex[:8]}"
        try:
            fs.mv(self.path, aside)
        except FileNotFoundError:
            return False
        moved = fs.cat_file(aside)
        fs.rm(aside)
        if seen.info is not None and _parse(moved) != seen.info:
            # Another run renewed or took it in between: put theirs back (unless a third run
            # already created one), and leave it to them.
            try:
                fs.pipe_file(self.path, moved, mode="create")
            except FileExistsError:
                pass
            return False
        return self._create(info)

    # Taking and giving back ------------------------------------------------------------------
    def acquire(self) -> "Lease":
        announced = False
        if self.store.renames:
            self.store.makedirs()
        while True:
            if self._create(self._new_info()):
                break
            seen = self._read()
            if seen is None:
                continue  # released in between: try again at once
            if seen.info is None:
                time.sleep(0.5)  # being written; a damaged one grows stale below
                seen = self._read()
                if seen is None:
                    continue
            info = seen.info or {}
            age = time.time() - float(info.get("heartbeat", 0))
            if age > self.stale_after_s:
                log.warning("Taking over the lease of %s from %s: its heartbeat stopped %.0f s ago "
                            "(stale after %.0f s).", self.store.root, describe(info), age, self.stale_after_s)
                if self._replace(seen, self._new_info(), takeover=True):
                    break
                continue
            if not self.wait:
                raise LeaseHeld(f"{self.store.root} is being written by {describe(info)}; wait for it to finish "
                                f"(or run with --wait)")
            if not announced:
                log.info("Waiting for the lease of %s, held by %s.", self.store.root, describe(info))
                announced = True
            time.sleep(self.poll_s)
        log.info("Holding the lease of %s as %s.", self.store.root, self.owner)
        self._thread = threading.Thread(target=self._beat, name="lease-heartbeat", daemon=True)
        self._thread.start()
        return self

    def _beat(self) -> None:
        while not self._stop.wait(self.stale_after_s / 4):
            with self._lock:
                self.renew()

    def renew(self) -> None:
        """Renew the heartbeat, if the lease is still this run's."""
        if self.lost:
            return
        seen = self._read()
        if seen is None or seen.info is None or seen.info.get("token") != self.info["token"]:
            self.lost = describe(seen.info) if seen and seen.info else "nobody (the lease file is gone)"
            log.error("The lease of %s was taken over by %s; this run stops at its next stage.",
                      self.store.root, self.lost)
            return
        if not self._replace(seen, self._new_info(), takeover=False):
            self.lost = "another run"

    def check(self) -> None:
        """Raise LeaseLost when another run has taken this run's lease."""
        if self.lost:
            raise LeaseLost(f"the lease of {self.store.root} was taken over by {self.lost}")

    def release(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join()
        with self._lock:
            seen = self._read()
            if seen and seen.info and self.info and seen.info.get("token") == self.info["token"]:
                self.store.fs.rm(self.path)
                self.store.fresh(self.path)

    def __enter__(self) -> "Lease":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
