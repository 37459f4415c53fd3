"""Model references: what a config names (a path, a hub id, or `tiny:NAME`) and the local path it loads.

A real reference is looked up under models_root (fetched there once by `tessera fetch-models`); a
`tiny:NAME` one is the tiny model of that kind, built once under models_root in the real format and
then loaded through the very same code path. Nothing is ever downloaded here.
"""
from __future__ import annotations

import hashlib
import importlib
import inspect
import logging
import os
import shutil
from typing import Callable

from tessera.models.cache import cache_root
from tessera.models.fetch import locate
from tessera.models.tiny import WORLD_WEIGHTS

# NAME -> "module:function(path)" that builds and saves the tiny model at `path`.
BUILDERS: dict[str, str] = {
    "clip": "tessera.models.clip:build_tiny",
    "aesthetic": "tessera.models.aesthetic:build_tiny",
    "nsfw": "tessera.models.nsfw:build_tiny",
    "watermark": "tessera.models.watermark:build_tiny",
    "vq": "tessera.models.vq:build_tiny",
    "t5": "tessera.models.text_encoder:build_tiny",
    "llava": "tessera.models.llava:build_tiny",
    # Trained on the demo's world (tessera.demo.world_models), shipped under world_weights/.
    "world-clip": "tessera.models.tiny:install_world_clip",
    "world-aesthetic": "tessera.models.tiny:install_world_aesthetic",
    "world-watermark": "tessera.models.tiny:install_world_watermark",
    "world-llava": "tessera.models.tiny:install_world_llava",
}

PREFIX = "tiny:"
log = logging.getLogger(__name__)


def resolve(ref: str, models_root: str) -> str:
    """The local path to load for a config's model reference: a tiny one is built if needed, any
    other is looked up under models_root (see tessera.models.fetch.locate), never downloaded."""
    if not ref.startswith(PREFIX):
        return locate(ref, models_root)
    name = ref[len(PREFIX):]
    if name not in BUILDERS:
        raise ValueError(f"unknown tiny model {ref!r}; known: {', '.join(sorted(BUILDERS)) or 'none'}")
    path = os.path.join(cache_root(models_root), name)  # built locally, also for a models_root on a store
    wanted = build_id(name)
    if _built(path) != wanted:
        module, func = BUILDERS[name].split(":")
        builder: Callable[[str], None] = getattr(importlib.import_module(module), func)
        if os.path.exists(path):
            log.info("%s: rebuilding %s, its build changed", path, ref)
        tmp = f"{path}.tmp-{os.getpid()}"
        builder(tmp)
        with open(os.path.join(tmp, ".complete"), "w") as f:
            f.write(wanted)
        if os.path.exists(path):
            shutil.rmtree(path)
        os.replace(tmp, path)
    return path


def build_id(name: str) -> str:
    """What a tiny model is built from: its builder's module source, or the shipped weights' sums.
    A model built from anything else is rebuilt, and the stages that used it redo their shards."""
    module = BUILDERS[name].split(":")[0]
    if name.startswith("world-"):
        with open(os.path.join(WORLD_WEIGHTS, "SHA256SUMS"), "rb") as f:
            source = b"".join(line for line in f if f" {name[len('world-'):]}/".encode() in line)
    else:
        source = inspect.getsource(importlib.import_module(module)).encode()
    return hashlib.sha256(source).hexdigest()[:16]


def build_of(path: str | None) -> str:
    """The build id of the tiny model at `path` (its folder, or a file in it); "" for any other model.
    Stage lineages include it, so a rebuilt tiny model redoes the shards computed with the old one."""
    if not path:
        return ""
    return _built(path if os.path.isdir(path) else os.path.dirname(path)) or ""


def _built(path: str) -> str | None:
    try:
        with open(os.path.join(path, ".complete")) as f:
            return f.read().strip()
    except FileNotFoundError:
        return None
