"""The token-shard format, the contract between tokenize and training:

tokens/{res}/{shard}.tar, one WebDataset sample per image: `{key}.codes.npy` (uint16, res/16 x
res/16), optional `{key}.codes_flip.npy` (the codes of the mirrored image), `{key}.json` (captions,
url, hash, scores) and optional `{key}.t5.npy` (float16, L x dim text-encoder features, no padding).
"""
from __future__ import annotations

import io
import json

import numpy as np
import webdataset as wds

from tessera.core.store import ShardStore
from tessera.core.tars import MAX_OWN_MEMBER_BYTES, TarProblem, tar_members

CODES, CODES_FLIP, META, FEATURES = "codes.npy", "codes_flip.npy", "json", "t5.npy"


def tokens_folder(resolution: int) -> str:
    return f"tokens/{resolution}"


def encode_npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()


def decode_npy(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


def sample_item(key: str, codes: bytes | np.ndarray, meta: bytes | dict, codes_flip: bytes | np.ndarray | None = None,
                features: bytes | np.ndarray | None = None) -> dict:
    """One sample as TarWriter takes it; arrays are encoded in the format's dtypes, bytes kept as given."""
    def npy(value, dtype):
        return value if isinstance(value, bytes) else encode_npy(np.asarray(value, dtype=dtype))

    item = {"__key__": key, CODES: npy(codes, np.uint16),
            META: meta if isinstance(meta, bytes) else json.dumps(meta).encode()}
    if codes_flip is not None and len(codes_flip):
        item[CODES_FLIP] = npy(codes_flip, np.uint16)
    if features is not None and len(features):
        item[FEATURES] = npy(features, np.float16)
    return item


def write_samples(fileobj, items: list[dict]) -> None:
    """Write sample items (sample_item's) to an open binary file as one tar."""
    with wds.TarWriter(fileobj) as tar:
        for item in items:
            tar.write(item)


def write_token_shard(store: ShardStore, resolution: int, shard: str, items: list[dict], marker: dict) -> int:
    """Write tokens/{res}/{shard}.tar whole, then its marker (with the tar's `bytes`); returns the size."""
    folder = tokens_folder(resolution)
    with store.open_atomic(folder, f"{shard}.tar") as f:
        write_samples(f, items)
    size = int(store.fs.size(store.path(folder, f"{shard}.tar")))
    store.mark_done(folder, shard, {**marker, "bytes": size})
    return size


class ShardIndex:
    """Random access to the members of one tar: key -> {extension: (offset, size)}, in tar order."""

    def __init__(self, store: ShardStore, folder: str, shard: str):
        self.path = store.path(folder, f"{shard}.tar")
        self.file = store.fs.open(self.path, "rb")
        self.members: dict[str, dict[str, tuple[int, int]]] = {}
        for member in tar_members(self.file, store.url(folder, f"{shard}.tar"), MAX_OWN_MEMBER_BYTES,
                                  wanted=lambda _: False):
            if member.refused:
                raise TarProblem(member.refused, f"{self.path}: member {member.name} ({member.size} bytes)")
            key, _, ext = member.name.rsplit("/", 1)[-1].partition(".")
            self.members.setdefault(key, {})[ext] = (member.offset, member.size)
        self.keys = list(self.members)

    def read(self, key: str, ext: str) -> bytes | None:
        where = self.members[key].get(ext)
        if where is None:
            return None
        self.file.seek(where[0])
        return self.file.read(where[1])

    def close(self) -> None:
        self.file.close()


def write_codes_shard(store: ShardStore, resolution: int, shard: str, samples: list[dict]) -> int:
    """Write a shard from plain samples {"key", "codes", "meta", optional "codes_flip", "t5"} and mark
    it done with its sample count; returns the tar's size."""
    items = [sample_item(s["key"], s["codes"], s["meta"], s.get("codes_flip"), s.get("t5")) for s in samples]
    return write_token_shard(store, resolution, shard, items, {"samples": len(samples)})
