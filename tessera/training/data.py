"""A streaming, deterministic, resumable loader over tokens/{res} code shards.

Order: every epoch shuffles the shard list, and every shard its samples, from (seed, epoch, shard),
so the stream is a pure function of the seed. A shard is read by seeking to its members (the tar
headers are indexed once), never unpacked. Per-sample randomness (short caption, flip) comes from
(seed, epoch, shard, offset) too. The position (epoch, shard, offset, seed, shard list) is therefore
all there is to save: a loader restored from `state_dict()` yields exactly the batches that follow.

A global batch is the next `global_batch` positions of the stream, and worker r of w takes
positions [r, r + 1) x global_batch / w of it: it steps over the other workers' positions using
the shards' member indexes alone, and reads its own slice only. A sample that cannot be used
(unreadable, wrong grid, no stored features where they are required) keeps its place as a row
with `valid` False, so no worker needs to know what the others read. A producer thread builds
the next batches while the model trains, and `read_threads` threads read the slice's samples
(several on object stores, whose reads wait on the network).
"""
from __future__ import annotations

import json
import logging
import queue
import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch

from tessera.config.train import CodesDataConfig
from tessera.models.generation import left_pad
from tessera.models.gpt import TEXT_POSITIONS
from tessera.core.lineage import check_one_selection
from tessera.core.store import ShardStore
from tessera.core.token_shards import ShardIndex, decode_npy, tokens_folder

log = logging.getLogger(__name__)

REMOTE_READ_THREADS = 8  # data.read_threads on an object store, unless the config sets it


@dataclass
class Position:
    epoch: int = 0
    shard: int = 0  # index into this epoch's shard order
    offset: int = 0  # samples of that shard already consumed
    shards: list[str] = field(default_factory=list)  # the shard list of this epoch

    def as_dict(self) -> dict:
        return {"epoch": self.epoch, "shard": self.shard, "offset": self.offset, "shards": list(self.shards)}


class CodesLoader:
    """Batches {"codes", "cond", "cond_mask", "valid"} for one worker, in a fixed order; with
    data.code_noise also "inputs": the codes the model reads, some replaced by random ones."""

    def __init__(self, store: ShardStore, cfg: CodesDataConfig, global_batch: int, rank: int = 0,
                 world: int = 1, text_encoder=None, caption_dim: int | None = None,
                 prefetch: int = 2, pin_memory: bool = False, text_positions: int = TEXT_POSITIONS,
                 vocab_size: int | None = None):
        if cfg.code_noise > 0 and not vocab_size:
            raise ValueError("data.code_noise needs the codebook size to draw random codes from (vocab_size)")
        if global_batch % world:
            raise ValueError(f"a global batch of {global_batch} does not split over {world} workers")
        self.store, self.cfg = store, cfg
        self.vocab_size = vocab_size
        self.folder = tokens_folder(cfg.resolution)
        self.grid = cfg.resolution // 16
        self.global_batch, self.rank, self.world = global_batch, rank, world
        self.local = global_batch // world
        self.text_encoder = text_encoder
        self.caption_dim = caption_dim or (text_encoder.dim if text_encoder is not None else None)
        self.text_positions = text_positions  # the model's text prefix: features are left-padded to it
        self.skipped: Counter = Counter()
        self.header_reads = 0  # shards opened by reading their tar headers: no stored index matched
        self.pos = Position()
        self._tar_bytes: dict[str, int | None] = {}  # this epoch's shards: the tar size their marker records
        self._index: tuple[tuple, ShardIndex, np.ndarray] | None = None
        self.prefetch = prefetch
        self.pin_memory = pin_memory  # page-locked batches, so copies to the GPU do not block
        self.read_threads = cfg.read_threads or (1 if store.is_local else REMOTE_READ_THREADS)
        self._pool: ThreadPoolExecutor | None = None
        self._queue: queue.Queue | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._consumed = self.pos.as_dict()

    # Position ------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """The position after the last batch handed out (not after what is prefetched)."""
        return {**self._consumed, "seed": self.cfg.seed}

    def load_state_dict(self, state: dict) -> None:
        if state.get("seed", self.cfg.seed) != self.cfg.seed:
            raise ValueError(f"the checkpoint's data seed {state['seed']} differs from the config's {self.cfg.seed}")
        self._halt()
        self.pos = Position(state["epoch"], state["shard"], state["offset"], list(state["shards"]))
        self._consumed = self.pos.as_dict()

    # Order ---------------------------------------------------------------------------------------
    def _epoch_shards(self) -> list[str]:
        markers = self.store.markers(self.folder)
        shards = sorted(markers)
        if not shards:
            raise FileNotFoundError(f"no finished code shards under {self.store.url(self.folder)}; "
                                    f"run the tokenize stage for resolution {self.cfg.resolution} first")
        check_one_selection(self.store, self.folder, shards)
        self._tar_bytes = {s: markers[s].get("bytes") for s in shards}
        order = np.random.default_rng([self.cfg.seed, self.pos.epoch]).permutation(len(shards))
        return [shards[i] for i in order]

    def _shard(self) -> tuple[ShardIndex, np.ndarray]:
        name = (self.pos.epoch, self.pos.shard, self.pos.shards[self.pos.shard])
        if self._index is None or self._index[0] != name:
            if name[2] not in self._tar_bytes:  # resumed mid-epoch: the shard list came from the checkpoint
                self._tar_bytes = {s: m.get("bytes") for s, m in self.store.markers(self.folder).items()}
            index = ShardIndex(self.store, self.folder, name[2], self._tar_bytes.get(name[2]))
            if index.from_headers:
                self.header_reads += 1
                log.warning("%s has no member index that matches it; its tar headers were read instead.",
                            self.store.url(self.folder, f"{name[2]}.tar"))
            order = np.random.default_rng([self.cfg.seed, self.pos.epoch, self.pos.shard]).permutation(len(index.keys))
            self._index = (name, index, order)
        return self._index[1], self._index[2]

    def _next_sample(self, mine: bool = True) -> tuple[ShardIndex, str, np.random.Generator | None]:
        """The next sample in the stream (key in a shard's index) and, when it is this worker's,
        its own random generator."""
        empty_epochs = 0
        while True:
            if not self.pos.shards:
                self.pos.shards = self._epoch_shards()
            if self.pos.shard >= len(self.pos.shards):
                self.pos = Position(self.pos.epoch + 1)
                empty_epochs += 1
                if empty_epochs > 1:
                    raise RuntimeError(f"the code shards under {self.store.url(self.folder)} hold no samples")
                continue
            index, order = self._shard()
            if self.pos.offset >= len(order):
                self.pos.shard, self.pos.offset = self.pos.shard + 1, 0
                continue
            key = index.keys[order[self.pos.offset]]
            rng = (np.random.default_rng([self.cfg.seed, self.pos.epoch, self.pos.shard, self.pos.offset])
                   if mine else None)
            self.pos.offset += 1
            return index, key, rng

    # Samples -------------------------------------------------------------------------------------
    def _read(self, index: ShardIndex, key: str, rng: np.random.Generator):
        """(codes, model inputs or None, features or caption), or (None, reason) when the sample
        cannot be used. Runs on the read threads: it touches nothing shared."""
        try:
            members = index.read_sample(key)
            meta = json.loads(members.get("json") or b"{}")
            flip = self.cfg.flip_prob > 0 and rng.random() < self.cfg.flip_prob and "codes_flip.npy" in members
            raw = members.get("codes_flip.npy" if flip else "codes.npy")
            if raw is None:
                return None, "no_codes"
            codes = decode_npy(raw)
        except Exception as e:  # noqa: BLE001 - one bad sample never stops training
            log.warning("Skipping sample %s: it cannot be read (%s).", key, e)
            return None, "unreadable"
        if codes.shape != (self.grid, self.grid):
            return None, "wrong_grid"
        caption = meta.get(self.cfg.caption) or meta.get("caption") or ""
        substituted = False
        if self.cfg.short_caption_prob > 0 and rng.random() < self.cfg.short_caption_prob and meta.get("caption_short"):
            caption, substituted = meta["caption_short"], True
        use_stored = self.cfg.text == "stored" or (self.cfg.text == "auto" and not substituted)
        use_stored = use_stored and "t5.npy" in members
        if self.cfg.text == "stored" and not use_stored:
            return None, "no_stored_features"
        codes = codes.astype(np.int64).reshape(-1)
        inputs = self._noisy(codes, rng) if self.cfg.code_noise > 0 else None
        feats = torch.from_numpy(decode_npy(members["t5.npy"]).astype(np.float32)) if use_stored else caption
        return codes, inputs, feats

    def _noisy(self, codes: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """The codes with a share `code_noise` replaced by random ones: what the model reads."""
        replaced = rng.random(codes.shape) < self.cfg.code_noise
        return np.where(replaced, rng.integers(0, self.vocab_size, codes.shape), codes)

    def _slice(self) -> list:
        """This worker's samples of the next global batch, stepping over the other workers'."""
        first, last = self.rank * self.local, (self.rank + 1) * self.local
        return [self._next_sample(mine=first <= i < last) for i in range(self.global_batch)][first:last]

    def _make_batch(self) -> dict:
        wanted = self._slice()
        if self.read_threads > 1:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.read_threads, thread_name_prefix="codes-read")
            read = list(self._pool.map(lambda w: self._read(*w), wanted))
        else:
            read = [self._read(*w) for w in wanted]
        empty = np.zeros(self.grid * self.grid, dtype=np.int64)
        rows = []
        for r in read:
            if len(r) == 2:  # unusable: its place stays, as a row the loss does not count
                self.skipped[r[1]] += 1
                rows.append((empty, empty if self.cfg.code_noise > 0 else None, None))
            else:
                rows.append(r)
        feats = [f for _, _, f in rows]
        to_encode = [i for i, f in enumerate(feats) if isinstance(f, str)]
        if to_encode:
            if self.text_encoder is None:
                raise RuntimeError("some samples have no stored caption features and no text encoder is "
                                   "configured (set text_encoder, or data.text: stored)")
            captions = [feats[i] for i in to_encode]
            encoded = self.text_encoder.encode([c for c in captions if c]) if any(captions) else []
            it = iter(encoded)
            for i, c in zip(to_encode, captions):
                feats[i] = next(it).float().cpu() if c else None
        dim = self.caption_dim or next((f.shape[1] for f in feats if f is not None and len(f)), 1)
        feats = [torch.zeros(0, dim) if f is None else f for f in feats]
        cond, cond_mask = left_pad(feats, dim, self.text_positions)
        batch = {"codes": torch.from_numpy(np.stack([c for c, _, _ in rows])), "cond": cond,
                 "cond_mask": cond_mask, "valid": cond_mask.any(1)}
        if self.cfg.code_noise > 0:
            batch["inputs"] = torch.from_numpy(np.stack([i for _, i, _ in rows]))
        return {k: v.pin_memory() for k, v in batch.items()} if self.pin_memory else batch

    # Iteration with a prefetch thread --------------------------------------------------------
    def _produce(self) -> None:
        try:
            while not self._stop.is_set():
                batch = self._make_batch()
                item = (batch, self.pos.as_dict())
                while not self._stop.is_set():
                    try:
                        self._queue.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
        except BaseException as e:  # noqa: BLE001 - handed to the consumer
            self._queue.put((e, None))

    def _halt(self) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread, self._queue = None, None
            self._stop.clear()
            # Rewind the producer's position to what was consumed.
            self.pos = Position(self._consumed["epoch"], self._consumed["shard"], self._consumed["offset"],
                                list(self._consumed["shards"]))

    def next_batch(self) -> dict:
        if self.prefetch <= 0:
            batch = self._make_batch()
            self._consumed = self.pos.as_dict()
            return batch
        if self._thread is None:
            self._queue = queue.Queue(maxsize=self.prefetch)
            self._thread = threading.Thread(target=self._produce, daemon=True, name="codes-loader")
            self._thread.start()
        batch, pos = self._queue.get()
        if isinstance(batch, BaseException):
            self._thread = None
            raise batch
        self._consumed = pos
        return batch

    def close(self) -> None:
        self._halt()
        self._index = None
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None

    def __iter__(self):
        while True:
            yield self.next_batch()
