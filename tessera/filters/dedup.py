"""Near-duplicates: images whose CLIP embeddings have a cosine of at least `min_similarity`.

Pairs are joined into groups (connected components); each group keeps the sample with the
lowest key and the others are dropped as `near_duplicate`, naming the kept one. `duplicate_of`
here is the exact all-pairs search over one set of embeddings; the select stage runs the same
search within clusters, at scale (tessera/pipelines/semdedup.py).
"""
from __future__ import annotations

from typing import Iterator

import numpy as np
import pandas as pd
import torch

from tessera.filters.base import Filter, Needs


def normalized(embeddings: np.ndarray) -> torch.Tensor:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    emb = torch.from_numpy(np.ascontiguousarray(embeddings, dtype=np.float32)).to(device)
    return torch.nn.functional.normalize(emb, dim=-1)


def similar_pairs(emb: torch.Tensor, min_similarity: float, block: int = 4096) -> Iterator[tuple[int, int]]:
    """Every pair (i, j), i < j, of rows of the L2-normalised `emb` with a cosine >= min_similarity."""
    for start in range(0, len(emb), block):
        sims = emb[start:start + block] @ emb[start:].T
        rows, cols = torch.nonzero(sims >= min_similarity, as_tuple=True)
        for i, j in zip((rows + start).tolist(), (cols + start).tolist()):
            if i < j:
                yield i, j


class Groups:
    """Union-find over 0..n-1 in which a group's root is always its lowest index."""

    def __init__(self, n: int):
        self.parent = np.arange(n)

    def root(self, i: int) -> int:
        parent = self.parent
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return int(i)

    def join(self, i: int, j: int) -> None:
        a, b = self.root(i), self.root(j)
        if a != b:
            self.parent[max(a, b)] = min(a, b)

    def roots(self) -> np.ndarray:
        return np.array([self.root(i) for i in range(len(self.parent))], dtype=np.int64)


class NearDuplicateFilter(Filter):
    name = "near_duplicate"
    needs = Needs.IMAGE_EMBEDDING

    def __init__(self, min_similarity: float, block: int = 4096):
        self.min_similarity = min_similarity
        self.block = block

    def duplicate_of(self, keys: list[str], embeddings: np.ndarray) -> np.ndarray:
        """For each sample, the key of the sample kept in its group ("" when it is the kept one)."""
        n = len(keys)
        if n == 0:
            return np.empty(0, dtype=object)
        order = np.argsort(np.asarray(keys, dtype=object), kind="stable")
        groups = Groups(n)  # positions in key order: the lowest position is the lowest key
        for i, j in similar_pairs(normalized(embeddings[order]), self.min_similarity, self.block):
            groups.join(i, j)
        kept_of = groups.roots()
        result = np.full(n, "", dtype=object)
        for pos in np.flatnonzero(kept_of != np.arange(n)):
            result[order[pos]] = keys[order[kept_of[pos]]]
        return result

    def decide(self, scores: pd.DataFrame) -> np.ndarray:
        dup = scores["duplicate_of"].fillna("").to_numpy(dtype=object)
        return np.where(dup != "", self.name, "").astype(object)

    def describe(self) -> dict:
        return {"min_similarity": self.min_similarity}
