"""Cutting the input on Ray: shards take exact row ranges across files and row groups, duplicate
URLs are found across files and hash partitions, and the driver reads footers only."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from tessera.config.download import DownloadConfig, SourceConfig
from tessera.config.ray import RayConfig
from tessera.pipelines import download, prepare
from tessera.core.store import ShardStore


def test_shards_and_duplicates_equal_a_whole_table_reference(tmp_path, ray_local, monkeypatch):
    rng = np.random.default_rng(0)
    urls = [f"http://127.0.0.1:1/{i}.jpg" for i in rng.integers(0, 30, size=61)]
    urls[5] = urls[17] = ""  # empty URLs are never duplicates of each other
    frame = pd.DataFrame({"URL": urls, "TEXT": [f"caption {i}" for i in range(61)],
                          "WIDTH": np.arange(61) * 10})
    folder = tmp_path / "in"
    folder.mkdir()
    for i, (a, b) in enumerate([(0, 20), (20, 21), (21, 61)]):  # one file holds a single row
        pq.write_table(pa.Table.from_pandas(frame.iloc[a:b], preserve_index=False), folder / f"part-{i}.parquet",
                       row_group_size=7)
    monkeypatch.setattr(prepare, "ROWS_PER_PARTITION", 13)  # 5 hash partitions
    store = ShardStore(str(tmp_path / "data"))
    source = SourceConfig(path=str(folder), columns={"url": "URL", "caption": "TEXT", "carry": ["WIDTH"]})
    shards = download.prepare(source, DownloadConfig(shard_size=9), store, RayConfig())

    assert shards == [f"{i:05d}" for i in range(7)]
    assert len(store.done_shards(prepare.DEDUP)) == 5
    table = pa.concat_tables([store.read_table(prepare.INPUT, f"{s}.parquet") for s in shards]).to_pandas()
    assert table["row_index"].tolist() == list(range(61))
    assert table["url"].tolist() == urls and table["WIDTH"].tolist() == [float(w) for w in frame["WIDTH"]]
    assert [b.decode() for b in table["caption_bytes"]] == frame["TEXT"].tolist()
    expected = set(np.flatnonzero(frame["URL"].duplicated() & (frame["URL"] != "")))
    assert prepare.duplicate_rows(store, 0, 60) == expected
    assert prepare.duplicate_rows(store, 18, 26) == {r for r in expected if 18 <= r <= 26}
    prepared = store.read_json(prepare.INPUT, "_prepared.json")
    assert prepared["rows"] == 61 and sum(prepared["rows_per_shard"].values()) == 61


def test_plan_covers_every_row_once():
    plan = prepare.plan_shards(["a", "b", "c"], [5, 0, 8], shard_size=4)
    assert [p["first"] for p in plan.values()] == [0, 4, 8, 12]
    assert plan["00001"]["slices"] == [("a", 4, 5), ("c", 0, 3)]
    covered = [(f, r) for p in plan.values() for f, a, b in p["slices"] for r in range(a, b)]
    assert covered == [("a", r) for r in range(5)] + [("c", r) for r in range(8)]


def test_a_partition_task_reads_only_its_partition_of_each_shard(tmp_path):
    store = ShardStore(str(tmp_path / "data"))
    rng = np.random.default_rng(1)
    parts, firsts = 4, [0, 50, 120]
    hashes = [rng.integers(0, 2**63, size=n, dtype=np.uint64) for n in (50, 70, 0)]
    hashes[0][3] = hashes[1][9] = np.uint64(prepare.EMPTY_URL)  # an empty URL goes to no partition
    for i, (h, first) in enumerate(zip(hashes, firsts)):
        store.write_bytes(prepare.partitioned_hashes(h, first, parts), prepare.INPUT, f"{i:05d}{prepare.URLS}")
    shards = [f"{i:05d}" for i in range(3)]
    header = 8 * (parts + 1)
    for part in range(parts):
        got = prepare.read_partition(store, shards, part, parts)
        for h, first, records in zip(hashes, firsts, got):
            mine = np.flatnonzero((h % np.uint64(parts) == part) & (h != np.uint64(prepare.EMPTY_URL)))
            assert records["row"].tolist() == (mine + first).tolist()  # in row order
            assert records["hash"].tolist() == h[mine].tolist()
    # Each partition's records are one contiguous byte range of the file: what the task reads.
    blob = store.fs.cat_file(store.path(prepare.INPUT, f"00001{prepare.URLS}"))
    offsets = np.frombuffer(blob[:header], "<i8")
    assert offsets[0] == 0 and offsets[-1] == 69 and len(blob) == header + 69 * prepare.HASHED.itemsize
