"""Duplicates: exact copies (the same image bytes, by the download's sha256) and near-duplicates
(images whose CLIP embeddings have a cosine of at least `min_similarity`).

Copies and near-duplicate pairs are joined into groups (connected components); each group keeps
the sample with the lowest key and the others are dropped as `exact_duplicate` or
`near_duplicate`, naming the kept one. `duplicate_of` here is the exact search over one set of
embeddings; the select stage runs the same search within clusters, at scale
(tessera/pipelines/semdedup.py).

`components` builds the groups in memory and time bounded at any skew: the cosines are computed
in fixed-size tiles; the lowest label is propagated across each tile's pairs (vectorised), and the
tile's few resulting edges are merged into the labels with one sparse connected-components call
(scipy). Pairs of two samples already in one group are never computed: once a group of 50,000
copies has formed, each further tile computes only its other rows.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
import torch
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from tessera.filters.base import Filter, Needs


def normalized(embeddings: np.ndarray) -> torch.Tensor:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    emb = torch.from_numpy(np.ascontiguousarray(embeddings, dtype=np.float32)).to(device)
    return torch.nn.functional.normalize(emb, dim=-1)


def join(labels: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Merge the groups of each pair (a[i], b[i]) into `labels`, where labels[i] is the lowest
    index of i's group. Vectorised: one connected-components call over the labels involved."""
    la, lb = labels[a], labels[b]
    differ = la != lb
    if not differ.any():
        return labels
    la, lb = la[differ], lb[differ]
    involved, index = np.unique(np.concatenate([la, lb]), return_inverse=True)
    m = len(la)
    graph = coo_matrix((np.ones(m, np.int8), (index[:m], index[m:])), shape=(len(involved), len(involved)))
    _, comp = connected_components(graph, directed=False)
    lowest = np.full(comp.max() + 1, np.iinfo(np.int64).max, np.int64)
    np.minimum.at(lowest, comp, involved)
    remap = np.arange(len(labels), dtype=np.int64)
    remap[involved] = lowest[comp]
    return remap[labels]


def components(emb: torch.Tensor, min_similarity: float, block: int = 1024) -> np.ndarray:
    """The group of every row of the L2-normalised `emb` (rows joined when their cosine reaches
    min_similarity, transitively), as the lowest row index in the group."""
    n = len(emb)
    labels = np.arange(n, dtype=np.int64)
    for start in range(0, n, block):
        rows = np.arange(start, min(start + block, n))
        for col_start in range(start, n, block):
            cols = np.arange(col_start, min(col_start + block, n))
            lr, lc = labels[rows], labels[cols]
            values, counts = np.unique(np.concatenate([lr, lc]), return_counts=True)
            if len(values) == 1:
                continue  # every pair of this tile is already in one group
            big = values[np.argmax(counts)]
            # Pairs of two members of the tile's largest group add nothing: leave them out.
            for r, c in ((rows, cols[lc != big]), (rows[lr != big], cols[lc == big])):
                if len(r) and len(c):
                    labels = _join_tile(labels, emb, r, c, min_similarity)
    return labels


def _rows(emb: torch.Tensor, index: np.ndarray) -> torch.Tensor:
    """emb[index]: a view when the index is a run of rows (the usual case), else a gather."""
    if index[-1] - index[0] == len(index) - 1:
        return emb[int(index[0]):int(index[-1]) + 1]
    return emb[torch.from_numpy(index).to(emb.device)]


def _join_tile(labels: np.ndarray, emb: torch.Tensor, r: np.ndarray, c: np.ndarray,
               min_similarity: float) -> np.ndarray:
    hit = (_rows(emb, r) @ _rows(emb, c).T >= min_similarity).cpu().numpy()
    if not hit.any():
        return labels
    new_r, new_c = tile_labels(hit, labels[r], labels[c])
    a, b = np.concatenate([r, c]), np.concatenate([new_r, new_c])
    moved = labels[a] != b
    return join(labels, a[moved], b[moved])


def tile_labels(hit: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Propagate the lowest label across one tile's pairs (`hit[i, j]`: row i ~ column j) until
    every row and column holds the lowest label of its connected part: at most one edge per row
    and column leaves the tile, however dense its pairs (a dense tile has a million)."""
    top = np.iinfo(np.int64).max
    while True:
        new_r = np.minimum(rows, np.where(hit, cols[None, :], top).min(axis=1))
        new_c = np.minimum(cols, np.where(hit, new_r[:, None], top).min(axis=0))
        if (new_r == rows).all() and (new_c == cols).all():
            return rows, cols
        rows, cols = new_r, new_c


def lowest_key_groups(keys: np.ndarray, labels_in_key_order: np.ndarray, order: np.ndarray) -> np.ndarray:
    """duplicate_of per row: the key of the group's lowest-key row, "" for that row itself."""
    out = np.full(len(keys), "", dtype=object)
    moved = np.flatnonzero(labels_in_key_order != np.arange(len(keys)))
    out[order[moved]] = keys[order[labels_in_key_order[moved]]]
    return out


def exact_duplicate_of(keys: np.ndarray, sha256: np.ndarray) -> np.ndarray:
    """For each sample, the lowest key with the same sha256 ("" for that one, and for samples
    without a hash: an unknown hash matches nothing)."""
    keys = np.asarray(keys, dtype=object)
    sha = pd.Series(sha256, dtype=object).fillna("").astype(str).to_numpy(dtype=object)
    out = np.full(len(keys), "", dtype=object)
    has = np.flatnonzero(sha != "")
    if not len(has):
        return out
    frame = pd.DataFrame({"sha": sha[has], "key": keys[has].astype(str), "row": has}).sort_values(["sha", "key"])
    first = frame.groupby("sha", sort=False)["key"].transform("first").to_numpy(dtype=object)
    copy = first != frame["key"].to_numpy(dtype=object)
    out[frame["row"].to_numpy()[copy]] = first[copy]
    return out


class ExactDuplicateFilter(Filter):
    name = "exact_duplicate"
    needs = Needs.METADATA

    def decide(self, scores: pd.DataFrame) -> np.ndarray:
        dup = scores["exact_duplicate_of"].fillna("").to_numpy(dtype=object) if "exact_duplicate_of" in scores \
            else np.full(len(scores), "", dtype=object)
        return np.where(dup != "", self.name, "").astype(object)

    def describe(self) -> dict:
        return {"by": "sha256"}


class NearDuplicateFilter(Filter):
    name = "near_duplicate"
    needs = Needs.IMAGE_EMBEDDING

    def __init__(self, min_similarity: float, block: int = 1024):
        self.min_similarity = min_similarity
        self.block = block

    def duplicate_of(self, keys: list[str], embeddings: np.ndarray) -> np.ndarray:
        """For each sample, the key of the sample kept in its group ("" when it is the kept one)."""
        n = len(keys)
        if n == 0:
            return np.empty(0, dtype=object)
        keys = np.asarray(keys, dtype=object)
        order = np.argsort(keys.astype(str), kind="stable")  # row positions in key order
        labels = components(normalized(embeddings[order]), self.min_similarity, self.block)
        return lowest_key_groups(keys, labels, order)

    def decide(self, scores: pd.DataFrame) -> np.ndarray:
        dup = scores["duplicate_of"].fillna("").to_numpy(dtype=object)
        return np.where(dup != "", self.name, "").astype(object)

    def describe(self) -> dict:
        return {"min_similarity": self.min_similarity}
