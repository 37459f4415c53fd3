import pyarrow as pa
import pytest

from tessera.core.store import ShardStore


@pytest.fixture(params=["local", "memory"])
def store(request, tmp_path):
    if request.param == "local":
        return ShardStore(str(tmp_path / "root"))
    return ShardStore(f"memory://tessera-test-{tmp_path.name}")


def test_atomic_write_leaves_nothing_on_failure(store):
    with pytest.raises(RuntimeError):
        with store.open_atomic("stage", "00000.bin") as f:
            f.write(b"half a shard")
            raise RuntimeError("crash mid-write")
    assert not store.exists("stage", "00000.bin")
    assert store.list("stage") == []


def test_markers_and_listing(store):
    table = pa.table({"key": ["a", "b"]})
    store.write_table(table, "scores", "00001.parquet")
    assert not store.is_done("scores", "00001")
    store.mark_done("scores", "00001", {"kept": 2})
    assert store.is_done("scores", "00001")
    assert store.done_info("scores", "00001") == {"kept": 2}
    assert store.done_shards("scores") == ["00001"]
    assert store.read_table("scores", "00001.parquet").equals(table)
    assert store.list("scores", ".parquet") == ["00001.parquet"]


def test_temporaries_are_ignored_and_cleared(store):
    store.write_bytes(b"done", "download", "00000.tar")
    with store.fs.open(store.path("download", "00001.tar.tmp-deadbeef"), "wb") as f:
        f.write(b"left by a crash")
    assert store.list("download") == ["00000.tar"]
    assert store.clear_temporaries("download") == 1
    assert store.clear_temporaries("download") == 0
    assert store.exists("download", "00000.tar")


def test_store_pickles_by_url(store):
    import pickle

    again = pickle.loads(pickle.dumps(store))
    assert again.root == store.root
