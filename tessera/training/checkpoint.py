"""Sharded training checkpoints with torch.distributed.checkpoint (DCP).

A checkpoint is a folder {run}/{stage}/checkpoints/step-NNNNNNNN/: every worker writes its own
part of the weights and optimizer state (DCP deduplicates DDP replicas and writes FSDP2 shards
as they are), rank 0 writes `train.json` (step, data position, config) first, and DCP writes
`.metadata` last: a folder without `.metadata` is unfinished and ignored. Every part and the
metadata are fsynced before the metadata is renamed into place, and the folder after, so after
a crash or a power cut a checkpoint is whole or not one at all. DCP reshards on load, so a run
saved by N workers resumes on M. Only the newest `keep` are kept.

`export` turns one into a single LlamaGen-format file (weights under `model`, optionally the
optimizer state LlamaGen's trainer resumes from) for sampling and sharing, and refuses models
LlamaGen's code would compute differently; `read_checkpoint_any` reads either kind (and
LlamaGen's own files).
"""
from __future__ import annotations

import json
import posixpath
import re

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint._fsspec_filesystem import FsspecWriter
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from tessera.core.crashpoints import crash_point
from tessera.core.store import ShardStore
from tessera.models.gpt import GPT, GPTConfig, llamagen_parameter_order, read_checkpoint
from tessera.models.identity import identity_of

FOLDER = "checkpoints"
_NAME = re.compile(r"^step-(\d{8})$")
TRAIN_STATE = "train.json"
DONE = ".metadata"  # written by DCP once every worker's part is in place


def checkpoint_steps(run: ShardStore) -> list[int]:
    """Steps of the finished checkpoints, oldest first."""
    return sorted(int(m.group(1)) for n in run.list(FOLDER)
                  if (m := _NAME.match(n)) and run.exists(FOLDER, n, DONE))


def checkpoint_url(run: ShardStore, step: int) -> str:
    return run.url(FOLDER, f"step-{step:08d}")


def latest_checkpoint(run: ShardStore) -> str | None:
    steps = checkpoint_steps(run)
    return checkpoint_url(run, steps[-1]) if steps else None


def step_of(url: str) -> int:
    """The step of a checkpoint folder `.../step-N`; 0 for any other name (a LlamaGen file, say)."""
    name = url.rstrip("/").rsplit("/", 1)[-1]
    digits = name.removeprefix("step-")
    return int(digits) if name.startswith("step-") and digits.isdigit() else 0


def stage_dir(runs_root: str, run: str, stage: str) -> str:
    return posixpath.join(runs_root.rstrip("/"), run, stage)


def is_sharded(url: str) -> bool:
    return ShardStore(url).exists(DONE)


class _LastMetadata:
    """DCP's writer, with a crash point between the parts and the metadata, and the folder
    fsynced once the metadata is renamed into place."""

    def __init__(self, url: str, step: int):
        super().__init__(url.removeprefix("file://"), sync_files=True)
        self.url, self.step = url, step

    def finish(self, metadata, results) -> None:
        crash_point("checkpoint_parts", "checkpoint", f"step-{self.step:08d}")
        super().finish(metadata, results)
        for folder in (self.url, posixpath.dirname(self.url.rstrip("/"))):  # the rename, the new folder
            ShardStore(folder).sync_folder()


class _LocalWriter(_LastMetadata, dcp.FileSystemWriter):
    pass


class _RemoteWriter(_LastMetadata, FsspecWriter):
    pass


def _writer(url: str, step: int):
    local = "://" not in url or url.startswith("file://")
    return (_LocalWriter if local else _RemoteWriter)(url, step)


class Checkpointer:
    """Saves (every worker calls `save`) and loads the sharded checkpoints of one run stage."""

    def __init__(self, run: ShardStore, keep: int, rank: int = 0, async_save: bool = False):
        self.run, self.keep, self.rank, self.async_save = run, max(keep, 1), rank, async_save
        self._pending = None
        # An asynchronous save runs its collectives from a background thread on CPU tensors: it
        # needs a gloo group, which an NCCL-only default group (Ray Train's) lacks. Its own group
        # also keeps those collectives apart from the training's.
        self._group = dist.new_group(backend="gloo") if async_save and _distributed() else None

    def save(self, step: int, model: torch.nn.Module, optimizer, train_state: dict) -> str:
        self.wait()  # one save in flight at a time
        url = checkpoint_url(self.run, step)
        if self.rank == 0:
            self.run.write_json({"step": step, **train_state}, FOLDER, f"step-{step:08d}", TRAIN_STATE)
        model_state, optim_state = get_state_dict(model, optimizer)
        state = {"model": model_state, "optim": optim_state}
        if self.async_save:
            self._pending = dcp.async_save(state, storage_writer=_writer(url, step), process_group=self._group,
                                           no_dist=not _distributed())
        else:
            dcp.save(state, storage_writer=_writer(url, step), no_dist=not _distributed())
            self._prune()
        return url

    def wait(self) -> None:
        if self._pending is not None:
            pending, self._pending = self._pending, None
            (getattr(pending, "upload_completion", None) or pending).result()
            self._prune()

    def _prune(self) -> None:
        if self.rank != 0:
            return
        for old in checkpoint_steps(self.run)[:-self.keep]:
            self.run.fs.rm(self.run.path(FOLDER, f"step-{old:08d}"), recursive=True)

    @staticmethod
    def load(url: str, model: torch.nn.Module, optimizer) -> dict:
        """Load weights and optimizer state in place (resharded to this job); returns train.json."""
        model_state, optim_state = get_state_dict(model, optimizer)
        state = {"model": model_state, "optim": optim_state}
        dcp.load(state, checkpoint_id=url, no_dist=not _distributed())
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
        return read_train_state(url)


def read_train_state(url: str) -> dict:
    store = ShardStore(url)
    return store.read_json(TRAIN_STATE)


def read_model_state(url: str) -> dict[str, torch.Tensor]:
    """The full, unsharded weights of a checkpoint, in this process (no process group needed)."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    reader = _reader(url)
    metadata = reader.read_metadata()
    model = {k.removeprefix("model."): torch.empty(m.size, dtype=m.properties.dtype)
             for k, m in metadata.state_dict_metadata.items()
             if k.startswith("model.") and isinstance(m, TensorStorageMetadata)}
    dcp.load({"model": model}, storage_reader=reader, no_dist=True)
    return model


def _reader(url: str):
    if "://" in url and not url.startswith("file://"):
        # torch exports no public name for it (dcp.save/load pick it by URL themselves).
        from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader

        return FsspecReader(url)
    return dcp.FileSystemReader(url.removeprefix("file://"))


def read_checkpoint_any(path: str) -> dict:
    """{"model": weights, ...} of a sharded checkpoint folder (plus its train.json) or of a file."""
    if is_sharded(path):
        return {"model": read_model_state(path), **read_train_state(path)}
    return read_checkpoint(path)


class ExportRefused(ValueError):
    """A model LlamaGen's own code would load but compute differently from."""


def export(src: str, out: str, dtype: torch.dtype | None = None, optimizer: bool = False) -> str:
    """One LlamaGen-format file: {"model": weights} (names are LlamaGen's), the model's identity
    (text_rope, rope_grid, resolution), our config and the step; with `optimizer`, the AdamW state
    as LlamaGen's trainer saves and resumes it (`optimizer`, `steps`).

    Refuses a model LlamaGen's code would compute differently: one trained with identity text
    rotations, or with rotary positions over another grid than its image's (LlamaGen rebuilds the
    table from the image grid)."""
    ckpt = read_checkpoint_any(src)
    ident = identity_of(ckpt, src)
    if ident.text_rope != "llamagen":
        raise ExportRefused(
            f"{src} was trained with text_rope {ident.text_rope!r}; LlamaGen's model code zeroes the text "
            "queries and keys ('llamagen'), so it would load this file and compute another function. "
            "Sample it with Tessera from the checkpoint itself.")
    if ident.rope_grid is not None and ident.resolution and ident.rope_grid != ident.resolution // 16:
        raise ExportRefused(
            f"{src} spans its rotary positions over a {ident.rope_grid}x{ident.rope_grid} grid at "
            f"{ident.resolution}px; LlamaGen's model code rebuilds them for the image's own grid, so it "
            "would compute another function.")
    if optimizer and dtype is not None:
        raise ValueError("an export with optimizer state is for resuming training: keep fp32 weights (--dtype fp32)")
    weights = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v)
               for k, v in ckpt["model"].items()}
    payload = {"model": weights, **ident.as_dict()}
    if "config" in ckpt:
        payload["config"] = json.loads(json.dumps(ckpt["config"]))
    if "step" in ckpt:
        payload["steps"] = int(ckpt["step"])
    if optimizer:
        if not is_sharded(src):
            raise ValueError(f"{src} is a single file: optimizer state is exported from a training checkpoint folder")
        payload["optimizer"] = llamagen_optimizer_state(src, GPTConfig(**ckpt["config"]["model_config"]))
    target = ShardStore(posixpath.dirname(out) or ".")
    with target.open_atomic(posixpath.basename(out)) as f:
        torch.save(payload, f)
    return out


def llamagen_optimizer_state(url: str, model_cfg: GPTConfig) -> dict:
    """The AdamW state of checkpoint folder `url` as LlamaGen's trainer saves it: parameters indexed
    in its model's order, two groups (weight decay on parameters of 2 or more dims, then the rest)."""
    with torch.device("cpu"):
        model = GPT(model_cfg, grid=1)
    params = dict(model.named_parameters())
    ordered = [params[name] for name in llamagen_parameter_order(model_cfg.n_layer)]
    if len(ordered) != len(params):
        raise ValueError("the model has parameters LlamaGen's layout does not name")
    optimizer = torch.optim.AdamW([{"params": [p for p in ordered if p.dim() >= 2]},
                                   {"params": [p for p in ordered if p.dim() < 2]}])
    model_state, optim_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optim": optim_state}
    dcp.load(state, storage_reader=_reader(url), no_dist=True)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    return optimizer.state_dict()


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def barrier() -> None:
    if _distributed():
        dist.barrier()
