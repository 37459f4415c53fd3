"""Duplicates at scale: exact copies by content hash, then near-duplicates in the manner of
SemDeDup and NeMo Curator's semantic dedup. Every pass is a set of Ray tasks that exchange rows
through few files (exchange.py); no task holds more than its partition.

Shards are read by tasks of `shards_per_task` shards; a shard's task is crc32(shard) % tasks, so
any later per-shard pass finds its shard's results without a listing.

1. Scan (select_work.dedup_scan): each task sends its survivors' (sha256, key) to the partition
   of the hash, and offers a deterministic sample of their embeddings for the k-means.
2. `exact_search`: one task per hash partition sorts its rows by (sha256, key): the lowest key of
   each hash is kept, the others are `exact_duplicate` of it. The copies go back to their tasks.
3. The driver trains spherical k-means on the sample (`train`).
4. Assign (select_work.dedup_assign): each task sends its survivors (exact copies left out) to
   their nearest centroid's partition, and also to the second nearest when that is within
   `spill_margin` of the nearest (an embedding near a boundary).
5. `search`: one task per partition searches each of its clusters exactly (a cluster above
   `max_cluster_size` is first split by a second k-means level, with the same spill), in tiles,
   into groups (filters.dedup.components). Members also sent to another partition are bridges.
6. `merge`: one task joins the groups that share a bridge member across partitions
   (semdedup/remap.parquet: local lowest key -> the lowest key of the joined group).
7. `resolve`: each task gathers its shards' exact copies and near-duplicates into one file,
   semdedup/decided/{task}.parquet, which every later per-shard pass reads (`duplicates`).

The result equals the exact all-pairs search whenever every near-duplicate pair shares a cluster
(and sub-cluster): always with one cluster; with more, a pair is missed only if its two members
have different nearest centroids and neither member's second-nearest centroid (within the margin)
is the other's nearest. For two unit vectors with cosine s, their cosines to any unit centroid
differ by at most sqrt(2 - 2s) (0.14 at s = 0.99), so a margin of twice that makes the top-2
assignment miss only pairs whose nearest centroids are both beaten by a third.
"""
from __future__ import annotations

import io
import math
import resource
import zlib

import numpy as np
import pandas as pd
import pyarrow as pa
import torch

from tessera.core.store import ShardStore
from tessera.filters.dedup import components, join
from tessera.pipelines import exchange, score

DEDUP = "semdedup"
EXACT_IN, EXACT_OUT = f"{DEDUP}/exact-in", f"{DEDUP}/exact-out"
NEAR_IN, NEAR_OUT = f"{DEDUP}/near-in", f"{DEDUP}/near-out"
BRIDGES, DECIDED = f"{DEDUP}/bridges", f"{DEDUP}/decided"
REMAP = "remap.parquet"


def peak_mb() -> float:
    """This worker's peak RSS so far: an upper bound of its current task's (returned by every dedup
    task as `task_peak_mb`, so a run can say what its largest task held)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def shard_id(shard: str) -> int:
    return zlib.crc32(shard.encode())


def task_of(shard: str, tasks: int) -> int:
    return shard_id(shard) % tasks


def name(index: int) -> str:
    return f"{index:05d}"


def read_embeddings(store: ShardStore, shard: str) -> np.ndarray:
    with store.fs.open(store.path(score.EMBEDDINGS, f"{shard}.npy"), "rb") as f:
        return np.load(io.BytesIO(f.read()))


def unit(emb: np.ndarray) -> np.ndarray:
    x = np.ascontiguousarray(emb, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def sample_rows(keys: np.ndarray, quota: int) -> np.ndarray:
    """Up to `quota` row positions, chosen by the hash of their keys (deterministic), in order."""
    return np.sort(np.argsort(pd.util.hash_array(keys.astype(str)), kind="stable")[:quota])


def train(samples: list[np.ndarray], n_clusters: int, niter: int, seed: int = 1234) -> np.ndarray:
    """Spherical k-means centroids (k, d), unit length; one centroid when there is too little data."""
    import faiss

    x = unit(np.concatenate(samples))
    k = min(n_clusters, len(x))
    if k <= 1:
        return np.ones((1, x.shape[1]), np.float32) / np.sqrt(x.shape[1])
    km = faiss.Kmeans(x.shape[1], k, niter=niter, spherical=True, seed=seed, verbose=False)
    km.train(x)
    return unit(km.centroids)


def nearest_two(x: np.ndarray, centroids: np.ndarray, margin: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each row's nearest centroid, its second nearest, and whether the second is within `margin`."""
    if len(centroids) == 1:
        first = np.zeros(len(x), np.int64)
        return first, first, np.zeros(len(x), bool)
    sims = x @ centroids.T
    top = np.argpartition(-sims, 1, axis=1)[:, :2]
    r = np.arange(len(x))
    a, b = sims[r, top[:, 0]], sims[r, top[:, 1]]
    first = np.where(a >= b, top[:, 0], top[:, 1])
    second = np.where(a >= b, top[:, 1], top[:, 0])
    return first, second, np.abs(a - b) <= margin


# Exact copies ------------------------------------------------------------------------------------
def send_hashes(store: ShardStore, task: str, keys: np.ndarray, sha256: np.ndarray, sids: np.ndarray,
                partitions: int) -> int:
    """Send (sha256, key, shard id) of rows with a hash to the hash's partition."""
    sha = np.asarray(sha256, dtype=object)
    has = np.flatnonzero(pd.notna(sha) & (sha != ""))
    sha = sha[has].astype(str)
    table = pa.table({"sha256": pa.array(sha.tolist(), pa.string()),
                      "key": pa.array(np.asarray(keys, dtype=object)[has].astype(str).tolist(), pa.string()),
                      "sid": pa.array(np.asarray(sids)[has], pa.int64())})
    to = pd.util.hash_array(sha) % partitions if len(sha) else np.zeros(0, np.int64)
    return exchange.send(store, EXACT_IN, task, table, to.astype(np.int64))


def exact_search(store: ShardStore, partition: str, writers: list[str], tasks: int) -> dict:
    """The copies of one hash partition: every key whose hash has a lower key, sent to its task."""
    table = exchange.receive(store, EXACT_IN, writers, int(partition))
    if table is None:
        return {"hashed": 0, "exact_duplicates": 0, "files_written": 0}
    frame = table.to_pandas().sort_values(["sha256", "key"], kind="stable")
    first = frame.groupby("sha256", sort=False)["key"].transform("first")
    copies = frame[first != frame["key"]].assign(duplicate_of=first[first != frame["key"]])
    out = pa.table({"key": pa.array(copies["key"].tolist(), pa.string()),
                    "duplicate_of": pa.array(copies["duplicate_of"].tolist(), pa.string()),
                    "sid": pa.array(copies["sid"].to_numpy(np.int64))})
    files = exchange.send(store, EXACT_OUT, partition, out, copies["sid"].to_numpy(np.int64) % tasks)
    return {"hashed": len(frame), "exact_duplicates": len(copies), "files_written": files, "task_peak_mb": peak_mb()}


# Near-duplicates ---------------------------------------------------------------------------------
def _emb_column(emb: np.ndarray) -> pa.Array:
    emb = np.ascontiguousarray(emb)
    width = emb.shape[1] * emb.itemsize
    return pa.FixedSizeBinaryArray.from_buffers(pa.binary(width), len(emb), [None, pa.py_buffer(emb.tobytes())])


def _emb_array(column: pa.ChunkedArray, dtype: str, dim: int) -> np.ndarray:
    arr = column.combine_chunks()
    data = np.frombuffer(arr.buffers()[1], dtype=dtype)
    return data[arr.offset * dim:(arr.offset + len(arr)) * dim].reshape(len(arr), dim)


def send_embeddings(store: ShardStore, task: str, keys: np.ndarray, sids: np.ndarray, emb: np.ndarray,
                    centroids: np.ndarray, spill_margin: float, partitions: int) -> dict:
    """Send each row to its nearest cluster's partition (and to its second nearest's when within
    the margin); return counts."""
    if not len(keys):
        return {"assigned": 0, "spilled": 0, "files_written": 0}
    first, second, spill = nearest_two(unit(emb), centroids, spill_margin)
    rows = np.concatenate([np.arange(len(emb)), np.flatnonzero(spill)])
    clusters = np.concatenate([first, second[spill]])
    parts = clusters % partitions
    bridge = np.zeros(len(emb), bool)
    bridge[spill] = (first[spill] % partitions) != (second[spill] % partitions)
    table = pa.table({"cluster": pa.array(clusters, pa.int32()),
                      "key": pa.array(np.asarray(keys, dtype=object)[rows].astype(str).tolist(), pa.string()),
                      "sid": pa.array(np.asarray(sids)[rows], pa.int64()),
                      "bridge": pa.array(bridge[rows], pa.bool_()),
                      "embedding": _emb_column(emb[rows])})
    table = table.replace_schema_metadata({"dtype": str(emb.dtype), "dim": str(emb.shape[1])})
    files = exchange.send(store, NEAR_IN, task, table, parts)
    return {"assigned": len(keys), "spilled": int(spill.sum()), "files_written": files, "task_peak_mb": peak_mb()}


def split(x: np.ndarray, cap: int, margin: float, niter: int, seed: int = 1234) -> list[np.ndarray]:
    """A cluster's rows (unit embeddings `x`) cut into sub-clusters of about `cap` by a second
    k-means level; a row near a sub-cluster boundary (within `margin`) is in both."""
    import faiss

    k = math.ceil(len(x) / cap)
    km = faiss.Kmeans(x.shape[1], k, niter=niter, spherical=True, seed=seed, verbose=False,
                      max_points_per_centroid=max(256, cap // 4))
    km.train(x)
    first, second, spill = nearest_two(x, unit(km.centroids), margin)
    rows = np.concatenate([np.arange(len(x)), np.flatnonzero(spill)])
    subs = np.concatenate([first, second[spill]])
    order = np.argsort(subs, kind="stable")
    return [r for r in np.split(rows[order], np.flatnonzero(np.diff(subs[order])) + 1) if len(r) > 1]


def search(store: ShardStore, partition: str, writers: list[str], tasks: int, min_similarity: float,
           max_cluster_size: int, block: int, spill_margin: float, niter: int) -> dict:
    """Exact cosine search within each cluster of one partition; send each group's members back."""
    table = exchange.receive(store, NEAR_IN, writers, int(partition))
    if table is None:
        return {"members": 0, "duplicates": 0, "bridges": 0, "split": 0, "largest_cluster": 0, "files_written": 0}
    meta = table.schema.metadata
    emb = _emb_array(table.column("embedding"), meta[b"dtype"].decode(), int(meta[b"dim"]))
    keys = np.asarray(table.column("key").to_pylist(), dtype=object).astype(str)
    clusters = table.column("cluster").to_numpy()
    unique, first_row, member = np.unique(keys, return_index=True, return_inverse=True)
    labels = np.arange(len(unique), dtype=np.int64)  # indices in key order: lowest index, lowest key
    order = np.argsort(clusters, kind="stable")
    cuts = np.flatnonzero(np.diff(clusters[order])) + 1
    split_count, largest = 0, 0
    device = "cuda" if torch.cuda.is_available() else "cpu"
    for rows in np.split(order, cuts):
        largest = max(largest, len(rows))
        if len(rows) < 2:
            continue
        x = emb[rows].astype(np.float32)
        x /= np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
        subs = None
        if len(rows) > max_cluster_size:
            subs = split(x, max_cluster_size, spill_margin, niter)
            split_count += 1
        for sub in subs if subs is not None else [slice(None)]:
            local = components(torch.from_numpy(x[sub]).to(device), min_similarity, block)
            m = member[rows[sub]]
            labels = join(labels, m, m[local])
        del x
    sids = table.column("sid").to_numpy()[first_row]
    bridge = np.zeros(len(unique), bool)
    np.logical_or.at(bridge, member, table.column("bridge").to_numpy(zero_copy_only=False))
    grouped = np.bincount(labels, minlength=len(unique))[labels] > 1
    dup = np.flatnonzero(labels != np.arange(len(unique)))
    out = pa.table({"key": unique[dup].tolist(), "duplicate_of": unique[labels[dup]].tolist(),
                    "sid": pa.array(sids[dup], pa.int64())})
    files = exchange.send(store, NEAR_OUT, partition, out, sids[dup] % tasks)
    links = np.flatnonzero(bridge & grouped)
    if len(links):
        store.write_table(pa.table({"key": unique[links].tolist(), "duplicate_of": unique[labels[links]].tolist(),
                                    "sid": pa.array(sids[links], pa.int64()),
                                    "root_sid": pa.array(sids[labels[links]], pa.int64())}),
                          BRIDGES, f"{partition}.parquet")
        files += 1
    return {"members": len(unique), "duplicates": int(len(dup)), "bridges": int(len(links)),
            "split": split_count, "largest_cluster": int(largest), "files_written": files, "task_peak_mb": peak_mb()}


def merge(store: ShardStore, _name: str, partitions: list[str]) -> dict:
    """Join groups across partitions through their shared members; write the lowest key of each
    joined group for every key whose group was joined (semdedup/remap.parquet)."""
    tables = [store.read_table(BRIDGES, f"{p}.parquet") for p in partitions if store.exists(BRIDGES, f"{p}.parquet")]
    if not tables:
        return {"bridges": 0, "remapped": 0}
    table = pa.concat_tables(tables)
    a = np.asarray(table.column("key").to_pylist(), dtype=object).astype(str)
    b = np.asarray(table.column("duplicate_of").to_pylist(), dtype=object).astype(str)
    unique, first, index = np.unique(np.concatenate([a, b]), return_index=True, return_inverse=True)
    sids = np.concatenate([table.column("sid").to_numpy(), table.column("root_sid").to_numpy()])[first]
    labels = join(np.arange(len(unique), dtype=np.int64), index[: len(a)], index[len(a):])
    moved = np.flatnonzero(labels != np.arange(len(unique)))
    store.write_table(pa.table({"key": unique[moved].tolist(), "duplicate_of": unique[labels[moved]].tolist(),
                                "sid": pa.array(sids[moved], pa.int64())}), DEDUP, REMAP)
    return {"bridges": len(a), "remapped": int(len(moved))}


def _lowest(table: pa.Table | None) -> pd.Series:
    if table is None:
        return pd.Series([], dtype=object)
    frame = table.select(["key", "duplicate_of"]).to_pandas()
    return frame.groupby("key")["duplicate_of"].min()


def resolve(store: ShardStore, task: str, partitions: list[str], tasks: int) -> dict:
    """Gather one task's exact copies and near-duplicates (joined across partitions) into
    semdedup/decided/{task}.parquet: key, exact_of, near_of, sent to each shard's id."""
    exact = exchange.receive(store, EXACT_OUT, partitions, int(task))
    near = exchange.receive(store, NEAR_OUT, partitions, int(task))
    sid = {}
    for t in (exact, near):
        if t is not None:
            sid.update(zip(t.column("key").to_pylist(), t.column("sid").to_pylist()))
    exact_of, local = _lowest(exact), _lowest(near)
    if store.exists(DEDUP, REMAP):
        remap = store.read_table(DEDUP, REMAP).to_pandas()
        # A group's lowest key in one partition may be a near-duplicate through another: its own
        # remap row (this task's keys only) names the joined group's lowest key.
        mine = remap[remap["sid"] % tasks == int(task)]
        sid.update(zip(mine["key"], mine["sid"]))
        remap = remap.set_index("key")["duplicate_of"]
        keys = pd.Index(local.index).union(pd.Index(mine["key"])).to_series()
        root = local.reindex(keys.index).fillna(keys)
        local = pd.concat([keys.map(remap).fillna(keys), root.map(remap).fillna(root)], axis=1).min(axis=1)
        local = local[local != local.index.to_series()]
    frame = pd.DataFrame({"exact_of": exact_of, "near_of": local}).fillna("")
    if not len(frame):
        return {"files_written": 0}
    to = np.array([sid[k] for k in frame.index], np.int64)
    table = pa.table({"key": pa.array(frame.index.astype(str).tolist(), pa.string()),
                      "exact_of": pa.array(frame["exact_of"].tolist(), pa.string()),
                      "near_of": pa.array(frame["near_of"].tolist(), pa.string())})
    return {"files_written": exchange.send(store, DECIDED, task, table, to), "task_peak_mb": peak_mb()}


def duplicates(store: ShardStore, shard: str, keys: np.ndarray, tasks: int) -> tuple[np.ndarray, np.ndarray]:
    """(exact_of, near_of) for the shard's rows, in order: the key each row is a copy or a
    near-duplicate of, "" when it is neither (or was not searched)."""
    exact = np.full(len(keys), "", dtype=object)
    near = np.full(len(keys), "", dtype=object)
    if tasks < 1:
        return exact, near
    table = exchange.receive(store, DECIDED, [name(task_of(shard, tasks))], shard_id(shard))
    if table is None:
        return exact, near
    index = pd.Index(np.asarray(keys, dtype=object).astype(str))
    found = index.get_indexer(table.column("key").to_pylist())
    ok = found >= 0
    exact[found[ok]] = np.asarray(table.column("exact_of").to_pylist(), dtype=object)[ok]
    near[found[ok]] = np.asarray(table.column("near_of").to_pylist(), dtype=object)[ok]
    return exact, near
