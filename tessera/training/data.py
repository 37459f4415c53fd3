"""A streaming, deterministic, resumable loader over tokens/{res} code shards.

Order: every epoch shuffles the shard list, and every shard its samples, from (seed, epoch, shard),
so the stream is a pure function of the seed. A shard is read by seeking to its members (the tar
headers are indexed once), never unpacked. Per-sample randomness (short caption, flip) comes from
(seed, epoch, shard, offset) too. The position (epoch, shard, offset, seed, shard list) is therefore
all there is to save: a loader restored from `state_dict()` yields exactly the batches that follow.

Each global batch is cut into one slice per worker; every worker reads the small codes and
metadata of the whole batch (so all agree on which samples are usable) but the caption
features of its own slice only.
"""
from __future__ import annotations

import json
import logging
import queue
import threading
from collections import Counter
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
        self.pos = Position()
        self._index: tuple[tuple, ShardIndex, np.ndarray] | None = None
        self.prefetch = prefetch
        self.pin_memory = pin_memory  # page-locked batches, so copies to the GPU do not block
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
        shards = self.store.done_shards(self.folder)
        if not shards:
            raise FileNotFoundError(f"no finished code shards under {self.store.url(self.folder)}; "
                                    f"run the tokenize stage for resolution {self.cfg.resolution} first")
        check_one_selection(self.store, self.folder, shards)
        order = np.random.default_rng([self.cfg.seed, self.pos.epoch]).permutation(len(shards))
        return [shards[i] for i in order]

    def _shard(self) -> tuple[ShardIndex, np.ndarray]:
        name = (self.pos.epoch, self.pos.shard, self.pos.shards[self.pos.shard])
        if self._index is None or self._index[0] != name:
            if self._index is not None:
                self._index[1].close()
            index = ShardIndex(self.store, self.folder, name[2])
            order = np.random.default_rng([self.cfg.seed, self.pos.epoch, self.pos.shard]).permutation(len(index.keys))
            self._index = (name, index, order)
        return self._index[1], self._index[2]

    def _next_sample(self) -> tuple[ShardIndex, str, np.random.Generator]:
        """The next sample in the stream (key in an open shard) and its own random generator."""
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
            rng = np.random.default_rng([self.cfg.seed, self.pos.epoch, self.pos.shard, self.pos.offset])
            self.pos.offset += 1
            return index, key, rng

    # Samples -------------------------------------------------------------------------------------
    def _usable(self, index: ShardIndex, key: str, rng: np.random.Generator):
        """(codes, caption, stored-features flag) or None with the reason counted in self.skipped."""
        try:
            meta = json.loads(index.read(key, "json") or b"{}")
            flip = self.cfg.flip_prob > 0 and rng.random() < self.cfg.flip_prob and "codes_flip.npy" in index.members[key]
            raw = index.read(key, "codes_flip.npy" if flip else "codes.npy")
            if raw is None:
                self.skipped["no_codes"] += 1
                return None
            codes = decode_npy(raw)
        except Exception as e:  # noqa: BLE001 - one bad sample never stops training
            self.skipped["unreadable"] += 1
            log.warning("Skipping sample %s: it cannot be read (%s).", key, e)
            return None
        if codes.shape != (self.grid, self.grid):
            self.skipped["wrong_grid"] += 1
            return None
        caption = meta.get(self.cfg.caption) or meta.get("caption") or ""
        substituted = False
        if self.cfg.short_caption_prob > 0 and rng.random() < self.cfg.short_caption_prob and meta.get("caption_short"):
            caption, substituted = meta["caption_short"], True
        use_stored = self.cfg.text == "stored" or (self.cfg.text == "auto" and not substituted)
        use_stored = use_stored and "t5.npy" in index.members[key]
        if self.cfg.text == "stored" and not use_stored:
            self.skipped["no_stored_features"] += 1
            return None
        return codes.astype(np.int64).reshape(-1), caption, use_stored

    def _noisy(self, codes: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """The codes with a share `code_noise` replaced by random ones: what the model reads."""
        replaced = rng.random(codes.shape) < self.cfg.code_noise
        return np.where(replaced, rng.integers(0, self.vocab_size, codes.shape), codes)

    def _features(self, index: ShardIndex, key: str, caption: str, stored: bool) -> torch.Tensor | str:
        if stored:
            return torch.from_numpy(decode_npy(index.read(key, "t5.npy")).astype(np.float32))
        return caption

    def _make_batch(self) -> dict:
        picked: list = []
        while len(picked) < self.global_batch:
            index, key, rng = self._next_sample()
            usable = self._usable(index, key, rng)
            if usable is None:
                continue
            mine = len(picked) // self.local == self.rank
            codes, caption, stored = usable
            inputs = self._noisy(codes, rng) if mine and self.cfg.code_noise > 0 else None
            picked.append((codes, inputs, self._features(index, key, caption, stored) if mine else None))
        mine = picked[self.rank * self.local:(self.rank + 1) * self.local]
        feats = [f for _, _, f in mine]
        to_encode = [i for i, f in enumerate(feats) if isinstance(f, str)]
        if to_encode:
            if self.text_encoder is None:
                raise RuntimeError("some samples have no stored caption features and no text encoder is "
                                   "configured (set text_encoder, or data.text: stored)")
            captions = [feats[i] for i in to_encode]
            encoded = self.text_encoder.encode([c for c in captions if c]) if any(captions) else []
            it = iter(encoded)
            for i, c in zip(to_encode, captions):
                feats[i] = next(it).float().cpu() if c else torch.zeros(0, self.caption_dim or 1)
        dim = self.caption_dim or next((f.shape[1] for f in feats if len(f)), 1)
        cond, cond_mask = left_pad(feats, dim, self.text_positions)
        batch = {"codes": torch.from_numpy(np.stack([c for c, _, _ in mine])), "cond": cond,
                 "cond_mask": cond_mask, "valid": cond_mask.any(1)}
        if self.cfg.code_noise > 0:
            batch["inputs"] = torch.from_numpy(np.stack([i for _, i, _ in mine]))
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
        if self._index is not None:
            self._index[1].close()
            self._index = None

    def __iter__(self):
        while True:
            yield self.next_batch()
