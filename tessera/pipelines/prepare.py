"""Cutting the input into download shards on Ray, with duplicate URLs found without a driver in the way.

    driver:  list the input files, read their footers (row counts) -> plan which rows each shard takes
    tasks:   one per shard (the stage runtime): read its rows, map column names, write
             download/_input/{shard}.parquet and the shard's URL hashes grouped by hash partition
             (download/_input/{shard}.urls: a header of partition offsets, then (hash, row) pairs)
    tasks:   one per hash partition: read only that partition's byte range of every shard's
             hashes, mark each non-empty URL seen at an earlier row; write
             download/_input/_duplicates/{p}.parquet

The driver holds the plan (a few numbers per shard); no input row passes through it, and no
partition task holds more than its own partition. A download task reads the duplicates that fall in its own row range (the files are sorted by row index, so
parquet statistics skip the rest).
"""
from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor

import fsspec
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from tessera.config.download import ColumnMap
from tessera.core.store import ShardStore, shard_name

INPUT = "download/_input"
DUPLICATES = f"{INPUT}/_duplicates"
DEDUP = f"{INPUT}/_dedup"  # the partition tasks' markers
# Rows whose URL hashes one partition task holds at once (16 bytes each, plus np.unique's copies).
ROWS_PER_PARTITION = 50_000_000
URLS = ".urls"
HASHED = np.dtype([("hash", "<u8"), ("row", "<i8")])
EMPTY_URL = int(pd.util.hash_pandas_object(pd.Series([""]), index=False).to_numpy(np.uint64)[0])


def file_rows(fs, files: list[str]) -> list[int]:
    """Rows per input file, from the parquet footers (read concurrently)."""
    def rows(path: str) -> int:
        with fs.open(path, "rb") as f:
            return pq.ParquetFile(f).metadata.num_rows

    with ThreadPoolExecutor(max_workers=16) as pool:
        return list(pool.map(rows, files))


def plan_shards(files: list[str], rows: list[int], shard_size: int) -> dict[str, dict]:
    """shard -> {"first": its first global row, "slices": [(file, start, stop), ...]}."""
    total = sum(rows)
    starts = np.concatenate([[0], np.cumsum(rows)])
    plan = {}
    for k in range(math.ceil(total / shard_size)):
        lo, hi = k * shard_size, min((k + 1) * shard_size, total)
        slices = []
        for i, path in enumerate(files):
            a, b = max(lo, starts[i]), min(hi, starts[i + 1])
            if a < b:
                slices.append((path, int(a - starts[i]), int(b - starts[i])))
        plan[shard_name(k)] = {"first": lo, "slices": slices}
    return plan


def read_rows(fs, path: str, start: int, stop: int, columns: list[str]) -> pa.Table:
    """Rows [start, stop) of one parquet file, reading only the row groups they fall in."""
    with fs.open(path, "rb") as f:
        pf = pq.ParquetFile(f)
        bounds = np.concatenate([[0], np.cumsum([pf.metadata.row_group(i).num_rows
                                                 for i in range(pf.metadata.num_row_groups)])])
        groups = [i for i in range(len(bounds) - 1) if bounds[i] < stop and bounds[i + 1] > start]
        table = pf.read_row_groups(groups, columns=columns)
    return table.slice(start - int(bounds[groups[0]]), stop - start)


def normalise(table: pa.Table, columns: ColumnMap, carried: list[str]) -> pa.Table:
    """url and caption_bytes (crawled text is not always UTF-8), and the carried columns; numeric
    carried columns become float64 (copies of LAION differ: WIDTH is int64 in some, float64 in others)."""
    data = {"url": table.column(columns.url).cast(pa.string()),
            "caption_bytes": table.column(columns.caption).cast(pa.binary())}
    for col in carried:
        values = table.column(col)
        if col != "hash" and (pa.types.is_integer(values.type) or pa.types.is_floating(values.type)):
            values = values.cast(pa.float64())
        data[col] = values
    return pa.table(data)


def url_hashes(urls: pa.ChunkedArray) -> np.ndarray:
    return pd.util.hash_pandas_object(urls.to_pandas().fillna(""), index=False).to_numpy(np.uint64)


def cut_shard(store: ShardStore, shard: str, plan: dict, columns: ColumnMap, carried: list[str],
              protocol: str, parts: int) -> dict:
    """One input shard: its rows from the input files, with their global row_index, and their URL hashes."""
    fs = fsspec.filesystem(protocol)
    wanted = [columns.url, columns.caption, *carried]
    pieces = [normalise(read_rows(fs, path, a, b, wanted), columns, carried) for path, a, b in plan["slices"]]
    table = pa.concat_tables(pieces)
    first = plan["first"]
    table = table.append_column("row_index", pa.array(np.arange(first, first + table.num_rows), pa.int64()))
    store.write_bytes(partitioned_hashes(url_hashes(table.column("url")), first, parts), INPUT, shard + URLS)
    store.write_table(table, INPUT, f"{shard}.parquet")
    return {"rows_in": table.num_rows}


def partitioned_hashes(hashes: np.ndarray, first: int, parts: int) -> bytes:
    """A shard's non-empty URL hashes with their global rows, grouped by partition (rows in order
    within each), after a header of parts + 1 offsets (in records): partition p is the records
    [offset[p], offset[p + 1])."""
    rows = np.flatnonzero(hashes != np.uint64(EMPTY_URL))
    part = (hashes[rows] % np.uint64(parts)).astype(np.int64)
    order = np.argsort(part, kind="stable")
    records = np.empty(len(rows), HASHED)
    records["hash"], records["row"] = hashes[rows[order]], rows[order] + first
    offsets = np.concatenate([[0], np.cumsum(np.bincount(part, minlength=parts))]).astype("<i8")
    return offsets.tobytes() + records.tobytes()


def read_partition(store: ShardStore, shards: list[str], part: int, parts: int) -> list[np.ndarray]:
    """Partition `part` of each shard's hash file: two batched range reads (the headers, then each
    file's own byte range), so a task never holds another partition's hashes."""
    paths = [store.path(INPUT, s + URLS) for s in shards]
    header = 8 * (parts + 1)
    heads = store.fs.cat_ranges(paths, [8 * part] * len(paths), [8 * (part + 2)] * len(paths), on_error="raise")
    spans = [np.frombuffer(h, "<i8") for h in heads]
    starts = [header + HASHED.itemsize * int(a) for a, _ in spans]
    ends = [header + HASHED.itemsize * int(b) for _, b in spans]
    wanted = [i for i, (a, b) in enumerate(zip(starts, ends)) if b > a]
    blobs = store.fs.cat_ranges([paths[i] for i in wanted], [starts[i] for i in wanted], [ends[i] for i in wanted],
                                 on_error="raise")
    out = [np.empty(0, HASHED)] * len(paths)
    for i, blob in zip(wanted, blobs):
        out[i] = np.frombuffer(blob, HASHED)
    return out


def partitions_for(rows: int) -> int:
    return max(1, math.ceil(rows / ROWS_PER_PARTITION))


def find_duplicates(store: ShardStore, partition: str, shards: list[str], parts: int) -> dict:
    """Rows of one hash partition whose non-empty URL appeared at an earlier row; written sorted by
    row index. Shards are read in order, so the first occurrence is the lowest row."""
    records = np.concatenate(read_partition(store, shards, int(partition), parts)) if shards else np.empty(0, HASHED)
    h, r = records["hash"], records["row"]
    later = np.ones(len(h), dtype=bool)
    later[np.unique(h, return_index=True)[1]] = False
    duplicates = np.sort(r[later]).astype(np.int64)
    store.write_table(pa.table({"row_index": duplicates}), DUPLICATES, f"{partition}.parquet")
    return {"rows_in": int(len(h)), "duplicates": int(len(duplicates))}


def duplicate_rows(store: ShardStore, first: int, last: int) -> set[int]:
    """Row indices in [first, last] whose URL appeared at an earlier row."""
    if not store.exists(DUPLICATES):
        return set()
    dataset = pads.dataset(store.path(DUPLICATES), filesystem=store.fs, format="parquet")
    field = pads.field("row_index")
    table = dataset.to_table(filter=(field >= first) & (field <= last))
    return set(table.column("row_index").to_pylist())
