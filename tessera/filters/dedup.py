"""Near-duplicates: images whose CLIP embeddings have a cosine of at least `min_similarity`.

A global step: it runs over every shard's stored embeddings at once, so duplicates are found
within and across shards. Pairs are joined into groups (union-find); each group keeps the sample
with the lowest key and the others are dropped as `near_duplicate`, naming the kept one.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from tessera.filters.base import Filter, Needs


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
        device = "cuda" if torch.cuda.is_available() else "cpu"
        emb = torch.from_numpy(np.ascontiguousarray(embeddings[order], dtype=np.float32)).to(device)
        emb = torch.nn.functional.normalize(emb, dim=-1)
        parent = np.arange(n)

        def root(i: int) -> int:
            while parent[i] != i:
                parent[i] = parent[parent[i]]
                i = parent[i]
            return i

        for start in range(0, n, self.block):
            sims = emb[start:start + self.block] @ emb[start:].T
            rows, cols = torch.nonzero(sims >= self.min_similarity, as_tuple=True)
            for i, j in zip((rows + start).tolist(), (cols + start).tolist()):
                if i < j:
                    a, b = root(i), root(j)
                    if a != b:  # the lower index (lower key) stays the root
                        parent[max(a, b)] = min(a, b)
        kept_of = np.array([root(i) for i in range(n)])
        result = np.full(n, "", dtype=object)
        for pos in range(n):
            if kept_of[pos] != pos:
                result[order[pos]] = keys[order[kept_of[pos]]]
        return result

    def decide(self, scores: pd.DataFrame) -> np.ndarray:
        dup = scores["duplicate_of"].fillna("").to_numpy(dtype=object)
        return np.where(dup != "", self.name, "").astype(object)

    def describe(self) -> dict:
        return {"min_similarity": self.min_similarity}
