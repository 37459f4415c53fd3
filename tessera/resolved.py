"""The resolved config (file, environment and --set overrides applied): printed by `tessera config`,
and saved beside a run's outputs so that what ran can be read back and rerun."""
from __future__ import annotations

import posixpath
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version

import yaml

from tessera.config import RunConfig
from tessera.core.store import ShardStore

FILE = "resolved-config.yaml"


def tessera_version() -> str:
    try:
        return version("tessera")
    except PackageNotFoundError:  # a checkout on sys.path, not installed
        return "unknown"


def as_yaml(cfg: RunConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False, allow_unicode=True)


def save(cfg: RunConfig, command: str, steps: list[str], run: str | None = None) -> list[str]:
    """Write the resolved config under data_root (curation) and runs_root/RUN (training, sampling,
    evaluation), whichever the steps write; returns the files written."""
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    text = f"# Resolved config of `tessera {command}`, {stamp}, tessera {tessera_version()}.\n" + as_yaml(cfg)
    roots = []
    if {"curate", "eval"} & set(steps):
        roots.append(cfg.data_root)
    if {"stage1", "stage2", "sample", "eval"} & set(steps):
        roots.append(posixpath.join(cfg.runs_root.rstrip("/"), run or cfg.name))
    written = []
    for root in roots:
        store = ShardStore(root)
        store.fs.makedirs(store.path(), exist_ok=True)
        with store.fs.open(store.path(FILE), "w") as f:
            f.write(text)
        written.append(store.url(FILE))
    return written
