"""The all-to-all exchange of dedup's passes, in few files.

A writer (a task over a group of shards, or over one partition) writes ONE parquet file holding
rows for every receiver, sorted by the receiver's number, one row group per receiver. A receiver
reads, from each writer's file, only its own row groups (found by the row-group statistics of the
`to` column), with a pool of threads: one footer and one range per file, no listing (the writers'
names are known), and a missing file is a writer that had nothing to send.

Files written: one per writing task and pass. At 60,000 shards in tasks of 64 shards and 256
partitions: 940 files per pass, where one file per (shard, partition) would be 15M.
"""
from __future__ import annotations

import posixpath
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from tessera.core.store import ShardStore

TO = "to"
READ_THREADS = 16


def send(store: ShardStore, folder: str, writer: str, table: pa.Table, to: np.ndarray) -> int:
    """Write `table`'s rows to their receivers `to` (one per row) as folder/{writer}.parquet.
    Returns the number of files written (0 when there is nothing to send)."""
    if not len(table):
        return 0
    order = np.argsort(to, kind="stable")
    to = np.asarray(to, dtype=np.int64)[order]
    table = table.take(pa.array(order)).add_column(0, TO, pa.array(to, pa.int64()))
    bounds = np.flatnonzero(np.diff(to)) + 1
    starts = np.concatenate([[0], bounds])
    ends = np.concatenate([bounds, [len(to)]])
    with store.open_atomic(folder, f"{writer}.parquet") as f:
        with pq.ParquetWriter(f, table.schema) as w:
            for a, b in zip(starts, ends):
                w.write_table(table.slice(a, b - a), row_group_size=b - a)
    return 1


def _read_one(store: ShardStore, path: str, receiver: int) -> pa.Table | None:
    if not store.fs.exists(path):
        return None
    with store.fs.open(path, "rb") as f:
        pf = pq.ParquetFile(f)
        col = pf.schema_arrow.get_field_index(TO)
        groups = []
        for g in range(pf.metadata.num_row_groups):
            st = pf.metadata.row_group(g).column(col).statistics
            if st is None or (st.min <= receiver <= st.max):
                groups.append(g)
        if not groups:
            return None
        t = pf.read_row_groups(groups)
    t = t.filter(pc.equal(t.column(TO), receiver))
    return t.drop_columns([TO]).replace_schema_metadata(t.schema.metadata)


def receive(store: ShardStore, folder: str, writers: list[str], receiver: int) -> pa.Table | None:
    """The rows every writer sent to `receiver`, concatenated in writer order (None when none)."""
    paths = [store.path(posixpath.join(folder, f"{w}.parquet")) for w in writers]
    with ThreadPoolExecutor(min(READ_THREADS, max(1, len(paths)))) as pool:
        parts = [t for t in pool.map(lambda p: _read_one(store, p, receiver), paths) if t is not None and len(t)]
    if not parts:
        return None
    meta = parts[0].schema.metadata
    return pa.concat_tables([p.replace_schema_metadata(None) for p in parts]).replace_schema_metadata(meta)
