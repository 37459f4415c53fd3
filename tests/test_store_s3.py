"""The shard store on a real S3 API server (moto's, on loopback): fresh listings, whole-object
writes, unreadable markers, and the storage section reaching every filesystem and Ray worker."""
from __future__ import annotations

import io
import logging
import pickle
import urllib.request

import fsspec
import pytest
import torch

from tessera.config import load_config
from tessera.config.storage import StorageConfig, apply_storage, forwarded_env
from tessera.core import runtime
from tessera.core.raytools import worker_env
from tessera.core.store import ShardStore, viewable_link
from tessera.models.cache import CACHE_ENV
from tessera.models.fetch import ModelMissing
from tessera.models.refs import resolve
from tessera.models.vq import load_vq
from tests.s3server import s3_with_credentials


@pytest.fixture(scope="module")
def endpoint():
    with s3_with_credentials() as url:
        yield url


@pytest.fixture
def bucket(endpoint, request):
    apply_storage(StorageConfig(endpoint=endpoint))
    name = request.node.name.replace("_", "-")[:50].lower()
    fsspec.filesystem("s3").mkdir(name)
    return f"s3://{name}"


def other_writer(endpoint: str):
    """A second, independent S3 client (another process's view of the bucket)."""
    return fsspec.filesystem("s3", endpoint_url=endpoint, skip_instance_cache=True, use_listings_cache=True)


def test_storage_section_sets_every_s3_filesystem(endpoint):
    apply_storage(StorageConfig(endpoint=endpoint, region="eu-west-1", options={"s3": {"requester_pays": True}}))
    fs = fsspec.filesystem("s3")
    assert fs.storage_options["endpoint_url"] == endpoint
    assert fs.storage_options["client_kwargs"] == {"region_name": "eu-west-1"}
    assert fs.storage_options["requester_pays"] is True and fs.storage_options["use_listings_cache"] is False
    env = worker_env()  # what Ray workers are started with
    assert '"endpoint_url": "%s"' % endpoint in env["FSSPEC_S3"] and env["AWS_ACCESS_KEY_ID"] == "testing"
    assert env["AWS_ENDPOINT_URL_S3"] == endpoint and env["HF_HUB_OFFLINE"] == "1"
    # Another section replaces it all, endpoint variables included.
    apply_storage(StorageConfig(anonymous=True))
    fs = fsspec.filesystem("s3")
    assert "endpoint_url" not in fs.storage_options and fs.storage_options["anon"] is True
    assert "AWS_ENDPOINT_URL_S3" not in forwarded_env()


def test_listings_are_fresh_after_another_process_writes(bucket, endpoint):
    store = ShardStore(f"{bucket}/data")
    store.mark_done("download", "00000", {"rows": 1})
    assert store.done_shards("download") == ["00000"]
    # Another client (a Ray worker) adds markers after this store listed the folder.
    other = other_writer(endpoint)
    other.ls(f"{bucket}/data/download")  # its own cache is filled, and must not matter either
    other.pipe(f"{bucket}/data/download/00001.done", b'{"rows": 2}')
    assert store.done_shards("download") == ["00000", "00001"]
    assert store.markers("download") == {"00000": {"rows": 1}, "00001": {"rows": 2}}
    assert store.is_done("download", "00001") and store.exists("download", "00001.done")
    other.rm(f"{bucket}/data/download/00000.done")
    assert store.done_shards("download") == ["00001"] and not store.is_done("download", "00000")


def test_object_writes_are_whole_or_absent(bucket):
    store = ShardStore(f"{bucket}/data")
    with pytest.raises(RuntimeError, match="cut"):
        with store.open_atomic("scores", "00000.parquet") as f:
            f.write(b"x" * 1000)
            raise RuntimeError("cut mid-write")
    assert not store.exists("scores", "00000.parquet") and store.list("scores") == []
    store.write_bytes(b"y" * (6 << 20), "scores", "00001.bin")  # above s3fs's multipart block size
    assert store.fs.size(store.path("scores", "00001.bin")) == 6 << 20
    assert [n for n in store.fs.ls(store.path("scores"), detail=False) if ".tmp-" in n] == []


def test_unreadable_markers_count_as_not_done_and_are_named(bucket, caplog):
    store = ShardStore(f"{bucket}/data")
    store.mark_done("score", "00000", {"fingerprint": "a"})
    store.fs.pipe(store.path("score", "00001.done"), b"")
    store.fs.pipe(store.path("score", "00002.done"), b'{"fingerprint": ')
    with caplog.at_level(logging.WARNING, logger="tessera.core.store"):
        assert store.markers("score") == {"00000": {"fingerprint": "a"}}
        assert store.marker_info("score", "00002") is None and not store.is_done("score", "00001")
    named = " ".join(r.getMessage() for r in caplog.records)
    assert f"{bucket}/data/score/00001.done" in named and f"{bucket}/data/score/00002.done" in named


def _count(store: ShardStore, shard: str) -> dict:
    store.write_bytes(shard.encode(), "out", f"{shard}.txt")
    return {"rows_in": 1}


def test_ray_workers_reach_the_store_with_the_drivers_options(bucket, endpoint, ray_local):
    """The store travels to workers with its options (endpoint, credentials), and the driver sees
    every marker its workers wrote, on the first run and on a rerun that redoes one shard."""
    opts = {"endpoint_url": endpoint, "key": "testing", "secret": "testing"}
    store = ShardStore(f"{bucket}/data", storage_options=opts)
    assert pickle.loads(pickle.dumps(store)).fs.storage_options["endpoint_url"] == endpoint
    shards = [f"{i:05d}" for i in range(4)]
    store.list("count")  # the driver lists before the workers write
    ran = runtime.run_stage("count", store, shards, _count, fingerprints={s: "v1" for s in shards})
    assert sorted(ran.done) == shards and sorted(store.markers("count")) == shards
    store.fs.rm(store.path("count", "00002.done"))
    again = runtime.run_stage("count", store, shards, _count, fingerprints={s: "v1" for s in shards})
    assert sorted(again.done) == ["00002"] and again.skipped == 3
    assert store.fs.cat(store.path("out", "00002.txt")) == b"00002"


def test_models_root_on_object_storage_is_read_through_a_cache_fetched_again_on_change(bucket, endpoint, tmp_path,
                                                                                       monkeypatch, caplog):
    """A real model folder (the tiny VQ, in its real format) and a one-file model in the bucket:
    copied once into the local cache, loaded from there, copied again only when an object changes."""
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    fs = fsspec.filesystem("s3")
    built = resolve("tiny:vq", str(tmp_path / "built"))
    fs.put(built, f"{bucket}/models/vq", recursive=True)
    fs.pipe(f"{bucket}/models/heads/head.pt", _tensor_file(1.0))
    models_root = f"{bucket}/models"
    cfg = load_config("configs/demo.yaml", [f"models_root={models_root}", "sample.vq=vq",
                                                  f"storage.endpoint={endpoint}"])
    with caplog.at_level(logging.INFO, logger="tessera.models.cache"):
        vq_path = resolve(cfg.sample.vq, cfg.models_root)
        assert vq_path.startswith(str(tmp_path / "cache")) and load_vq(vq_path).quantize.embedding.weight.shape[0] > 0
        head = resolve("heads/head.pt", models_root)
        assert torch.load(head, weights_only=True)["w"].item() == 1.0
        assert resolve("vq", models_root) == vq_path and resolve("heads/head.pt", models_root) == head
        assert sum("Copying" in r.getMessage() for r in caplog.records) == 2  # once each
        fs.pipe(f"{bucket}/models/heads/head.pt", _tensor_file(2.0))  # replaced on the store
        assert torch.load(resolve("heads/head.pt", models_root), weights_only=True)["w"].item() == 2.0
        assert sum("Copying" in r.getMessage() for r in caplog.records) == 3
    # Tiny models are built in the cache; a model that is not in the bucket is named with the URL.
    assert resolve("tiny:t5", models_root).startswith(str(tmp_path / "cache"))
    with pytest.raises(ModelMissing, match=f"'missing.pt' is not in models_root \\({models_root}\\)"):
        resolve("missing.pt", models_root)


def _tensor_file(value: float) -> bytes:
    buf = io.BytesIO()
    torch.save({"w": torch.tensor(value)}, buf)
    return buf.getvalue()


def test_report_link_is_a_presigned_url_a_browser_opens_without_credentials(bucket, tmp_path):
    store = ShardStore(f"{bucket}/data")
    page = b"<!doctype html><title>Filter report</title><h1>funnel</h1>"
    store.write_bytes(page, "reports", "report.html")
    link = viewable_link(store.url("reports", "report.html"))
    assert link.startswith("http://127.0.0.1:") and "Signature=" in link and "Expires=" in link
    with urllib.request.urlopen(link, timeout=10) as response:  # plain HTTP, no AWS client or keys
        assert response.read() == page and response.headers["Content-Type"].startswith("text/html")
    assert viewable_link(store.url("reports")) == store.url("reports")  # a folder: its URL
    local = ShardStore(str(tmp_path / "data"))
    local.write_bytes(page, "reports", "report.html")
    assert viewable_link(local.url("reports", "report.html")) == f"file://{tmp_path}/data/reports/report.html"
