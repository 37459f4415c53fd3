"""Learnable code shards for the training tests and benchmarks, written in the token-shard format."""
from __future__ import annotations

import numpy as np

from tessera.core.store import ShardStore
from tessera.core.token_shards import write_codes_shard


def write_synthetic_codes(store: ShardStore, resolution: int, shards: int = 2, per_shard: int = 16,
                          vocab: int = 256, caption_dim: int = 32, classes: int = 4, seed: int = 0,
                          stored_features: bool = True) -> None:
    """Learnable code shards: each sample draws a class; its codes are the class's fixed random
    grid, its caption names the class, and its stored features are the class's fixed vectors."""
    rng = np.random.default_rng(seed)
    grid = resolution // 16
    patterns = rng.integers(0, vocab, size=(classes, grid, grid))
    features = rng.standard_normal((classes, 6, caption_dim)).astype(np.float16)
    for s in range(shards):
        samples = []
        for i in range(per_shard):
            c = int(rng.integers(classes))
            key = f"{s:05d}{i:04d}"
            samples.append({"key": key, "codes": patterns[c], "codes_flip": patterns[c][:, ::-1],
                            "t5": features[c][: 3 + c] if stored_features else None,
                            "meta": {"key": key, "caption": f"pattern number {c}", "caption_long": None,
                                     "caption_short": None, "url": f"http://127.0.0.1:1/{key}.jpg",
                                     "hash": i, "sha256": f"{i:064x}", "scores": {}}})
        write_codes_shard(store, resolution, f"{s:05d}", samples)
