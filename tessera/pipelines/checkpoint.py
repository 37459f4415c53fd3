"""Training checkpoints of a run stage: step-NNNNNNNN.pt under {run}/{stage}/checkpoints/.

Each is written under a temporary name and renamed into place, so a crash never leaves a file that
looks finished; only the newest `keep` are kept. The weights sit under `model`, as in LlamaGen's
checkpoints, so the same loader reads both.
"""
from __future__ import annotations

import posixpath
import re

import torch

from tessera.models.gpt import read_checkpoint
from tessera.pipelines.store import ShardStore

FOLDER = "checkpoints"
_NAME = re.compile(r"^step-(\d{8})\.pt$")


def checkpoint_steps(run: ShardStore) -> list[int]:
    return sorted(int(m.group(1)) for n in run.list(FOLDER) if (m := _NAME.match(n)))


def checkpoint_url(run: ShardStore, step: int) -> str:
    return run.url(FOLDER, f"step-{step:08d}.pt")


def latest_checkpoint(run: ShardStore) -> str | None:
    steps = checkpoint_steps(run)
    return checkpoint_url(run, steps[-1]) if steps else None


def save_checkpoint(run: ShardStore, step: int, payload: dict, keep: int) -> str:
    with run.open_atomic(FOLDER, f"step-{step:08d}.pt") as f:
        torch.save(payload, f)
    for old in checkpoint_steps(run)[:-max(keep, 1)]:
        run.fs.rm(run.path(FOLDER, f"step-{old:08d}.pt"))
    return checkpoint_url(run, step)


def load_checkpoint(url: str) -> dict:
    return read_checkpoint(url)


def stage_dir(runs_root: str, run: str, stage: str) -> str:
    return posixpath.join(runs_root.rstrip("/"), run, stage)
