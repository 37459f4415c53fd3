"""The resolved config (file, environment and --set overrides applied): printed by `tessera config`,
and saved beside a run's outputs so that what ran can be read back and rerun."""
from __future__ import annotations

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


def save(cfg: RunConfig, command: str, root: str) -> str:
    """Write the resolved config under `root` (a data_root, once its lease is held, or a run's
    folder); returns the file's URL."""
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    text = f"# Resolved config of `tessera {command}`, {stamp}, tessera {tessera_version()}.\n" + as_yaml(cfg)
    store = ShardStore(root)
    store.fs.makedirs(store.path(), exist_ok=True)
    with store.fs.open(store.path(FILE), "w") as f:
        f.write(text)
    return store.url(FILE)
