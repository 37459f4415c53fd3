"""Near-duplicates at scale, in the manner of SemDeDup and NeMo Curator's semantic dedup.

1. `sample`: each shard offers a bounded, deterministic sample of its survivors' CLIP embeddings
   (the rows with the smallest key hashes); the driver trains spherical k-means on them (faiss).
2. `assign`: each shard assigns its survivors to their nearest centroid, and also to the second
   nearest when that is within `spill_margin` of the nearest (an embedding near a boundary), and
   writes them to one file per partition of the clusters: semdedup/parts/{partition}/{shard}.parquet.
3. `search`: one task per partition runs the exact cosine search within each of its clusters and
   joins the pairs into groups (connected components, lowest key kept), as the all-pairs search
   does. It writes semdedup/dups/{shard}/{partition}.parquet (key, the group's lowest key), and
   semdedup/bridges/{partition}.parquet for the members of a group that were also sent to
   another partition.
4. `merge`: one task joins the groups that share a bridge member across partitions and writes
   semdedup/remap.parquet: local lowest key -> the lowest key of the joined group.

The result equals the exact all-pairs search whenever every near-duplicate pair shares a cluster:
always with one cluster; with more, a pair is missed only if its two members have different nearest
centroids and neither member's second-nearest centroid (within the margin) is the other's nearest.
For two unit vectors with cosine s, their cosines to any unit centroid differ by at most
sqrt(2 - 2s) (0.14 at s = 0.99), so a margin of twice that makes the top-2 assignment miss only
pairs whose nearest centroids are both beaten by a third. More clusters: less work per cluster and
more such misses; `spill_margin` trades extra copies for fewer misses.
"""
from __future__ import annotations

import io
import posixpath

import numpy as np
import pandas as pd
import pyarrow as pa

from tessera.core.store import ShardStore
from tessera.filters.dedup import Groups, normalized, similar_pairs
from tessera.pipelines import score

DEDUP = "semdedup"


def read_embeddings(store: ShardStore, shard: str) -> np.ndarray:
    with store.fs.open(store.path(score.EMBEDDINGS, f"{shard}.npy"), "rb") as f:
        return np.load(io.BytesIO(f.read()))


def _survivors(store: ShardStore, shard: str, plan) -> tuple[np.ndarray, np.ndarray]:
    from tessera.pipelines import select_work

    frame = select_work.read_frame(store, shard)
    alive = np.flatnonzero(select_work.reasons(frame, plan) == "")
    return frame["key"].to_numpy(dtype=object)[alive], alive


def sample(store: ShardStore, shard: str, plan, quota: int) -> dict:
    """Up to `quota` survivors' embeddings, chosen by the hash of their keys (deterministic)."""
    keys, alive = _survivors(store, shard, plan)
    if not len(alive):
        return {"survivors": 0, "sample": None}
    chosen = alive[np.argsort(pd.util.hash_array(keys.astype(str)), kind="stable")[:quota]]
    return {"survivors": len(alive), "sample": read_embeddings(store, shard)[np.sort(chosen)]}


def train(samples: list[np.ndarray], n_clusters: int, niter: int, seed: int = 1234) -> np.ndarray:
    """Spherical k-means centroids (k, d), unit length; one centroid when there is too little data."""
    import faiss

    x = np.ascontiguousarray(np.concatenate(samples).astype(np.float32))
    x /= np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    k = min(n_clusters, len(x))
    if k <= 1:
        return np.ones((1, x.shape[1]), np.float32) / np.sqrt(x.shape[1])
    km = faiss.Kmeans(x.shape[1], k, niter=niter, spherical=True, seed=seed, verbose=False)
    km.train(x)
    c = km.centroids.astype(np.float32)
    return c / np.maximum(np.linalg.norm(c, axis=1, keepdims=True), 1e-12)


def _emb_column(emb: np.ndarray) -> pa.Array:
    emb = np.ascontiguousarray(emb)
    width = emb.shape[1] * emb.itemsize
    return pa.FixedSizeBinaryArray.from_buffers(pa.binary(width), len(emb), [None, pa.py_buffer(emb.tobytes())])


def _emb_array(column: pa.ChunkedArray, dtype: str, dim: int) -> np.ndarray:
    arr = column.combine_chunks()
    data = np.frombuffer(arr.buffers()[1], dtype=dtype)
    return data[arr.offset * dim:(arr.offset + len(arr)) * dim].reshape(len(arr), dim)


def assign(store: ShardStore, shard: str, plan, centroids: np.ndarray, spill_margin: float, partitions: int) -> dict:
    """Write the shard's survivors to their clusters' partition files; return counts."""
    keys, alive = _survivors(store, shard, plan)
    if not len(alive):
        return {"assigned": 0, "spilled": 0}
    emb = read_embeddings(store, shard)[alive]
    unit = emb.astype(np.float32)
    unit /= np.maximum(np.linalg.norm(unit, axis=1, keepdims=True), 1e-12)
    sims = unit @ centroids.T
    if len(centroids) > 1:
        top = np.argpartition(-sims, 1, axis=1)[:, :2]
        first = np.where(sims[np.arange(len(sims)), top[:, 0]] >= sims[np.arange(len(sims)), top[:, 1]],
                         top[:, 0], top[:, 1])
        second = np.where(first == top[:, 0], top[:, 1], top[:, 0])
        gap = sims[np.arange(len(sims)), first] - sims[np.arange(len(sims)), second]
        spill = gap <= spill_margin
    else:
        first = np.zeros(len(emb), np.int64)
        second, spill = first, np.zeros(len(emb), bool)
    rows = np.concatenate([np.arange(len(emb)), np.flatnonzero(spill)])
    clusters = np.concatenate([first, second[spill]])
    parts = clusters % partitions
    bridge = np.zeros(len(emb), bool)
    bridge[spill] = (first[spill] % partitions) != (second[spill] % partitions)
    for p in np.unique(parts):
        sel = parts == p
        table = pa.table({"cluster": pa.array(clusters[sel], pa.int32()),
                          "key": pa.array(keys[rows[sel]].tolist(), pa.string()),
                          "bridge": pa.array(bridge[rows[sel]], pa.bool_()),
                          "embedding": _emb_column(emb[rows[sel]])})
        table = table.replace_schema_metadata({"dtype": str(emb.dtype), "dim": str(emb.shape[1])})
        store.write_table(table, DEDUP, "parts", f"{p:05d}", f"{shard}.parquet")
    return {"assigned": len(alive), "spilled": int(spill.sum())}


def search(store: ShardStore, partition: str, min_similarity: float, block: int = 4096) -> dict:
    """Exact cosine search within each cluster of one partition; write its groups' members."""
    names = store.list(posixpath.join(DEDUP, "parts", partition), ".parquet")
    if not names:
        return {"members": 0, "duplicates": 0, "bridges": 0}
    tables = []
    for name in names:
        t = store.read_table(DEDUP, "parts", partition, name)
        meta = t.schema.metadata
        shard = name[: -len(".parquet")]
        tables.append(t.append_column("shard", pa.array([shard] * len(t), pa.string())))
    table = pa.concat_tables([t.replace_schema_metadata(None) for t in tables])
    emb = _emb_array(table.column("embedding"), meta[b"dtype"].decode(), int(meta[b"dim"]))
    keys = np.asarray(table.column("key").to_pylist(), dtype=object)
    clusters = table.column("cluster").to_numpy()
    unique, first_row, member = np.unique(keys.astype(str), return_index=True, return_inverse=True)
    groups = Groups(len(unique))  # indices in key order: a group's lowest index is its lowest key
    for c in np.unique(clusters):
        rows = np.flatnonzero(clusters == c)
        for i, j in similar_pairs(normalized(emb[rows]), min_similarity, block):
            groups.join(member[rows[i]], member[rows[j]])
    roots = groups.roots()
    size = np.bincount(roots, minlength=len(unique))
    grouped = size[roots] > 1
    shards = np.asarray(table.column("shard").to_pylist(), dtype=object)[first_row]
    bridge = np.zeros(len(unique), bool)
    np.logical_or.at(bridge, member, table.column("bridge").to_numpy(zero_copy_only=False))
    dup = np.flatnonzero(roots != np.arange(len(unique)))
    for shard in np.unique(shards[dup]) if len(dup) else []:
        sel = dup[shards[dup] == shard]
        store.write_table(pa.table({"key": unique[sel].tolist(), "duplicate_of": unique[roots[sel]].tolist()}),
                          DEDUP, "dups", shard, f"{partition}.parquet")
    links = np.flatnonzero(bridge & grouped)
    if len(links):
        store.write_table(pa.table({"key": unique[links].tolist(), "duplicate_of": unique[roots[links]].tolist()}),
                          DEDUP, "bridges", f"{partition}.parquet")
    return {"members": len(unique), "duplicates": int(len(dup)), "bridges": int(len(links))}


def merge(store: ShardStore) -> dict:
    """Join groups across partitions through their shared members; write the lowest key of each
    joined group for every key whose group was joined (semdedup/remap.parquet)."""
    names = store.list(posixpath.join(DEDUP, "bridges"), ".parquet")
    if not names:
        return {"bridges": 0, "remapped": 0}
    table = pa.concat_tables([store.read_table(DEDUP, "bridges", n) for n in names])
    a = np.asarray(table.column("key").to_pylist(), dtype=object).astype(str)
    b = np.asarray(table.column("duplicate_of").to_pylist(), dtype=object).astype(str)
    unique, index = np.unique(np.concatenate([a, b]), return_inverse=True)
    groups = Groups(len(unique))
    for i, j in zip(index[: len(a)], index[len(a):]):
        groups.join(int(i), int(j))
    roots = groups.roots()
    moved = np.flatnonzero(roots != np.arange(len(unique)))
    store.write_table(pa.table({"key": unique[moved].tolist(), "duplicate_of": unique[roots[moved]].tolist()}),
                      DEDUP, "remap.parquet")
    return {"bridges": len(a), "remapped": int(len(moved))}


def duplicates(store: ShardStore, shard: str, keys: np.ndarray) -> np.ndarray:
    """duplicate_of for the shard's rows, in order: the lowest key of each row's group, "" for the
    row kept in its group (and for rows that were not searched)."""
    best: dict[str, str] = {}
    folder = posixpath.join(DEDUP, "dups", shard)
    for name in store.list(folder, ".parquet"):
        t = store.read_table(folder, name)
        for k, d in zip(t.column("key").to_pylist(), t.column("duplicate_of").to_pylist()):
            best[k] = min(best.get(k, d), d)
    remap: dict[str, str] = {}
    if store.exists(DEDUP, "remap.parquet"):
        t = store.read_table(DEDUP, "remap.parquet")
        remap = dict(zip(t.column("key").to_pylist(), t.column("duplicate_of").to_pylist()))
    out = np.full(len(keys), "", dtype=object)
    for i, k in enumerate(keys):
        root = min(remap.get(k, k), remap.get(best.get(k, k), best.get(k, k)))
        if root != k:
            out[i] = root
    return out
