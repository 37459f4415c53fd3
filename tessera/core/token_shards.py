"""The token-shard format, the contract between tokenize and training:

tokens/{res}/{shard}.tar, one WebDataset sample per image: `{key}.codes.npy` (uint16, res/16 x
res/16), optional `{key}.codes_flip.npy` (the codes of the mirrored image), `{key}.json` (captions,
url, hash, scores) and optional `{key}.t5.npy` (float16, L x dim text-encoder features, no padding).

Beside each tar, tokens/{res}/{shard}.index.json holds where every member's bytes lie in it
(computed once, when the tar is written), so readers seek straight to a sample instead of
parsing the tar's headers; the shard's marker names it and records the tar's size it matches.
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
    """Write tokens/{res}/{shard}.tar whole, its member index, then its marker (with the tar's
    `bytes` and the index's name); returns the size."""
    folder = tokens_folder(resolution)
    buf = io.BytesIO()
    write_samples(buf, items)
    blob = buf.getvalue()
    members = index_members(io.BytesIO(blob), store.url(folder, f"{shard}.tar"))
    with store.open_atomic(folder, f"{shard}.tar") as f:
        f.write(blob)
    store.write_json({"bytes": len(blob), "members": members}, folder, index_name(shard))
    store.mark_done(folder, shard, {**marker, "bytes": len(blob), "index": index_name(shard)})
    return len(blob)


def index_name(shard: str) -> str:
    return f"{shard}.index.json"


def index_members(fileobj, label: str) -> dict[str, dict[str, list[int]]]:
    """key -> {extension: [offset, size]} of a tar's members, in tar order, from its headers."""
    members: dict[str, dict[str, list[int]]] = {}
    for member in tar_members(fileobj, label, MAX_OWN_MEMBER_BYTES, wanted=lambda _: False):
        if member.refused:
            raise TarProblem(member.refused, f"{label}: member {member.name} ({member.size} bytes)")
        key, _, ext = member.name.rsplit("/", 1)[-1].partition(".")
        members.setdefault(key, {})[ext] = [member.offset, member.size]
    return members


class ShardIndex:
    """Random access to the members of one tar: key -> {extension: [offset, size]}, in tar order.

    The index comes from tokens/{res}/{shard}.index.json when it matches the tar's size
    (`tar_bytes`, from the shard's marker; None: trust it), else from the tar's headers. Reads are
    ranged reads of the file (one per sample), so several threads may read at once."""

    def __init__(self, store: ShardStore, folder: str, shard: str, tar_bytes: int | None = None):
        self.fs, self.path = store.fs, store.path(folder, f"{shard}.tar")
        stored = self._stored(store, folder, shard)
        if stored is not None and (tar_bytes is None or stored.get("bytes") == tar_bytes):
            self.members = stored["members"]
            self.from_headers = False
        else:
            with store.fs.open(self.path, "rb") as f:
                self.members = index_members(f, store.url(folder, f"{shard}.tar"))
            self.from_headers = True
        self.keys = list(self.members)

    @staticmethod
    def _stored(store: ShardStore, folder: str, shard: str) -> dict | None:
        try:
            return store.read_json(folder, index_name(shard))
        except (FileNotFoundError, ValueError):
            return None

    def read_sample(self, key: str) -> dict[str, bytes]:
        """Every member of one sample, {extension: bytes}, in one ranged read (they lie together)."""
        where = self.members[key]
        start = min(off for off, _ in where.values())
        end = max(off + size for off, size in where.values())
        blob = self.fs.cat_file(self.path, start=start, end=end)
        return {ext: blob[off - start:off - start + size] for ext, (off, size) in where.items()}

    def read(self, key: str, ext: str) -> bytes | None:
        where = self.members[key].get(ext)
        if where is None:
            return None
        return self.fs.cat_file(self.path, start=where[0], end=where[0] + where[1])


def write_codes_shard(store: ShardStore, resolution: int, shard: str, samples: list[dict]) -> int:
    """Write a shard from plain samples {"key", "codes", "meta", optional "codes_flip", "t5"} and mark
    it done with its sample count; returns the tar's size."""
    items = [sample_item(s["key"], s["codes"], s["meta"], s.get("codes_flip"), s.get("t5")) for s in samples]
    return write_token_shard(store, resolution, shard, items, {"samples": len(samples)})
