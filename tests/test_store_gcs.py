"""The shard store on gs:// against a GCS API emulator on loopback (gcp-storage-emulator, a
subprocess on 127.0.0.1), reached through the storage section: fresh listings, whole-object
writes, unreadable markers.

gcsfs asks GCS's gRPC control plane for each bucket's layout (hierarchical namespace or not)
unless GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT is false; an emulator has no such service, and every
request would wait a minute for it, so these tests use gcsfs's plain JSON-API filesystem. The
emulator ignores `ifGenerationMatch`, so the lease's exclusive create is not tested here."""
from __future__ import annotations

import logging
import os
import subprocess
import sys
import tempfile
import time
import urllib.request

import fsspec
import pytest

from tessera.config.storage import StorageConfig, apply_storage
from tessera.core.store import ShardStore
from tests.s3server import free_port

gcsfs = pytest.importorskip("gcsfs")


@pytest.fixture(scope="module")
def endpoint():
    port = free_port()
    log = tempfile.TemporaryFile()
    server = os.path.join(os.path.dirname(sys.executable), "gcp-storage-emulator")
    proc = subprocess.Popen([server, "start", "--host", "127.0.0.1", "--port", str(port), "--in-memory"],
                            stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"{url}/storage/v1/b?project=test", timeout=2).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    log.seek(0)
                    raise RuntimeError(f"GCS emulator did not start: {log.read().decode()[-2000:]}") from None
                time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        log.close()


@pytest.fixture
def bucket(endpoint, request):
    # gs:// as gcsfs's JSON-API filesystem (see the module's note), for this test only.
    before = {p: fsspec.get_filesystem_class(p) for p in ("gs", "gcs")}
    for p in before:
        fsspec.register_implementation(p, gcsfs.core.GCSFileSystem, clobber=True)
    apply_storage(StorageConfig(options={"gcs": {"endpoint_url": endpoint, "token": "anon", "project": "test"}}))
    name = request.node.name.replace("_", "-")[:50].lower()
    fsspec.filesystem("gs").mkdir(name)
    yield f"gs://{name}"
    apply_storage(StorageConfig())
    for p, cls in before.items():
        fsspec.register_implementation(p, cls, clobber=True)


def other_writer(endpoint: str):
    """Another process's view of the bucket, with its own listing cache."""
    return gcsfs.core.GCSFileSystem(endpoint_url=endpoint, token="anon", project="test",
                                    skip_instance_cache=True, use_listings_cache=True)


def test_the_storage_section_reaches_gcs_and_listings_are_fresh(bucket, endpoint):
    store = ShardStore(f"{bucket}/data")
    assert store.fs.storage_options["endpoint_url"] == endpoint and store.protocol == "gs" and not store.renames
    store.mark_done("download", "00000", {"rows": 1})
    assert store.done_shards("download") == ["00000"]
    other = other_writer(endpoint)
    other.ls(f"{bucket}/data/download")
    other.pipe(f"{bucket}/data/download/00001.done", b'{"rows": 2}')
    assert store.markers("download") == {"00000": {"rows": 1}, "00001": {"rows": 2}}
    other.rm(f"{bucket}/data/download/00000.done")
    assert store.done_shards("download") == ["00001"] and not store.is_done("download", "00000")


def test_gcs_writes_are_whole_or_absent_and_bad_markers_are_named(bucket, caplog):
    store = ShardStore(f"{bucket}/data")
    with pytest.raises(RuntimeError, match="cut"):
        with store.open_atomic("scores", "00000.parquet") as f:
            f.write(b"x" * 1000)
            raise RuntimeError("cut mid-write")
    assert not store.exists("scores", "00000.parquet")
    store.write_bytes(b"y" * (6 << 20), "scores", "00001.bin")  # gcsfs's resumable upload
    assert store.fs.size(store.path("scores", "00001.bin")) == 6 << 20
    store.fs.pipe(store.path("score", "00002.done"), b"")
    with caplog.at_level(logging.WARNING, logger="tessera.core.store"):
        assert store.markers("score") == {}
    assert f"{bucket}/data/score/00002.done" in " ".join(r.getMessage() for r in caplog.records)
