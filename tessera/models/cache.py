"""Models on object storage: a models_root (or a model reference) that is an s3:// or gs:// URL is
read through a local cache, because the loaders (torch, Hugging Face, open_clip) read local files.

A model (one object, or every object under a folder) is copied once into the cache folder, and
loaded from there. The copy records each object's ETag (or content hash) and size; when any of
them changes on the store, or an object is added or removed, the model is copied again. One
process per machine copies a model at a time (a file lock), so the actors of one node share one copy.

The cache lives under $TESSERA_MODEL_CACHE (default ~/.cache/tessera/models), in one folder per
models_root. Tiny models are built there too: they are built, never stored.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import posixpath
import shutil
import uuid
from contextlib import contextmanager
from typing import Iterator

import fsspec

log = logging.getLogger(__name__)

CACHE_ENV = "TESSERA_MODEL_CACHE"
DEFAULT_CACHE = os.path.join("~", ".cache", "tessera", "models")
SOURCES = ".sources"  # per model: what its copy was made from


def is_remote(url: str) -> bool:
    """An fsspec URL of a store the loaders cannot read directly (anything but a local path)."""
    return "://" in url and not url.startswith("file://")


def cache_root(models_root: str) -> str:
    """The local folder that stands for a remote models_root (itself, for a local one)."""
    if not is_remote(models_root):
        return models_root.removeprefix("file://")
    base = os.path.expanduser(os.environ.get(CACHE_ENV) or DEFAULT_CACHE)
    key = hashlib.sha256(models_root.rstrip("/").encode()).hexdigest()[:16]
    return os.path.join(base, key)


def _versions(fs: fsspec.AbstractFileSystem, path: str) -> dict[str, list]:
    """Relative name -> [size, version] of the object at `path`, or of every object under it."""
    fs.invalidate_cache(path)
    fs.invalidate_cache(posixpath.dirname(path.rstrip("/")))
    found = fs.find(path, detail=True, withdirs=False)
    out = {}
    for name, info in found.items():
        rel = posixpath.relpath(name, path) if name.rstrip("/") != path.rstrip("/") else ""
        version = info.get("ETag") or info.get("etag") or info.get("md5Hash") or info.get("crc32c") \
            or info.get("mtime") or info.get("LastModified")
        out[rel] = [info.get("size"), str(version)]
    return out


@contextmanager
def _locked(path: str) -> Iterator[None]:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def cached_copy(url: str, local: str) -> str | None:
    """`local`, a copy of the object or folder at `url` as it is now; None when nothing is there."""
    fs, path = fsspec.core.url_to_fs(url)
    versions = _versions(fs, path)
    if not versions:
        return None
    record = os.path.join(os.path.dirname(local), SOURCES,
                          hashlib.sha256(local.encode()).hexdigest()[:16] + ".json")
    wanted = {"url": url, "objects": versions}
    with _locked(record + ".lock"):
        if os.path.exists(local) and _read(record) == wanted:
            return local
        log.info("Copying %s (%d object(s), %.1f MB) into the model cache %s.", url, len(versions),
                 sum(v[0] or 0 for v in versions.values()) / 1e6, local)
        tmp = f"{local}.tmp-{uuid.uuid4().hex[:8]}"
        os.makedirs(os.path.dirname(local), exist_ok=True)
        try:
            if list(versions) == [""]:
                fs.get_file(path, tmp)
            else:
                for rel in versions:
                    os.makedirs(os.path.dirname(os.path.join(tmp, rel)), exist_ok=True)
                    fs.get_file(posixpath.join(path, rel), os.path.join(tmp, rel))
            # The record goes first (stale), then the copy, then the record of what it holds:
            # a crash between them leaves a copy that does not match its record, fetched again.
            _remove(record)
            _remove(local)
            os.replace(tmp, local)
        finally:
            _remove(tmp)
        with open(record + ".tmp", "w") as f:
            json.dump(wanted, f)
        os.replace(record + ".tmp", record)
    return local


def _read(path: str) -> dict | None:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    elif os.path.lexists(path):
        os.remove(path)
