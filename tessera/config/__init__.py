"""Run configs: one YAML file per run, validated into typed objects.

`load_config(path, overrides)` reads the file, applies environment and command-line
overrides, and validates. Every mistake (unknown key, wrong type, missing value) is raised
as a ConfigError naming the file and the dotted key.
"""
from __future__ import annotations

import os
from pathlib import Path
from types import UnionType
from typing import Any, Iterable, Literal, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ValidationError

from tessera.config.base import Section
from tessera.config.caption import CaptionConfig
from tessera.config.download import DownloadConfig, SourceConfig
from tessera.config.eval import EvalConfig
from tessera.config.models import ModelSource
from tessera.config.ray import RayConfig
from tessera.config.filters import FiltersConfig
from tessera.config.storage import StorageConfig, apply_storage
from tessera.config.tokenize import TokenizeConfig
from tessera.config.train import SampleConfig, TrainConfig

# Environment variables that override one key each: paths and addresses.
ENV_OVERRIDES = {
    "TESSERA_DATA_ROOT": "data_root",
    "TESSERA_RUNS_ROOT": "runs_root",
    "TESSERA_MODELS_ROOT": "models_root",
    "TESSERA_SOURCE": "source.path",
    "RAY_ADDRESS": "ray.address",
}


class ConfigError(ValueError):
    """A run config that cannot be used, with the file and key that are wrong."""


class RunConfig(Section):
    name: str  # the run's name; also the training run's name under runs_root unless --run gives one
    data_root: str  # the dataset root: a local path or an fsspec URL (s3://, gs://, ...)
    # Where training runs live ({runs_root}/{run}/{stage}/): a local path or an fsspec URL.
    runs_root: str = "runs"
    # Where models live: `tiny:NAME` ones are built here (tessera.models.tiny), `tessera fetch-models`
    # downloads the others here, and runs look for them here (a relative model path is under it).
    # An object-store URL (s3://bucket/models) is read through a local cache ($TESSERA_MODEL_CACHE).
    models_root: str = "models"
    # Where `tessera fetch-models` gets the models this config names, keyed by the name as written
    # (path, file name or hub id); these add to and override the built-in sources.
    model_sources: dict[str, ModelSource] = {}
    # Object storage (s3://, gs://): endpoint, region, anonymous access, extra fsspec options.
    storage: StorageConfig = StorageConfig()
    # A local Ray, or the cluster to join.
    ray: RayConfig = RayConfig()
    # The input: its kind, path and columns.
    source: SourceConfig
    # The download stage; its decoding and size rules also apply to the read input kinds.
    download: DownloadConfig = DownloadConfig()
    # Scoring and selection: the score and select stages read this one section.
    filters: FiltersConfig = FiltersConfig()
    # Re-captioning of the kept samples (LLaVA), between select and tokenize.
    caption: CaptionConfig = CaptionConfig()
    # Code shards of the kept samples: VQ codes and caption features.
    tokenize: TokenizeConfig = TokenizeConfig()
    # Training at 256px (16x16 codes); null: the config has no stage 1.
    stage1: TrainConfig | None = None
    # Training at 512px (32x32 codes) from stage 1's weights; null: the config has no stage 2.
    stage2: TrainConfig | None = None
    # A PNG grid of prompts from a checkpoint; null: the config has no sample step.
    sample: SampleConfig | None = None
    # Evaluation of checkpoints (FID, CLIP score, prompt-following) and of the tokenizer.
    eval: EvalConfig | None = None


def _is_text(annotation: Any) -> bool:
    """A str field, a choice of strings (Literal), or either or None."""
    kinds = [a for a in (get_args(annotation) if get_origin(annotation) in (Union, UnionType) else (annotation,))
             if a is not type(None)]
    return bool(kinds) and all(k is str or (get_origin(k) is Literal and all(isinstance(v, str) for v in get_args(k)))
                               for k in kinds)


def _section_of(annotation: Any) -> type[BaseModel] | None:
    kinds = get_args(annotation) if get_origin(annotation) in (Union, UnionType) else (annotation,)
    return next((k for k in kinds if isinstance(k, type) and issubclass(k, BaseModel)), None)


def _takes_text(key: str) -> bool:
    """Whether the dotted key names a text field of RunConfig: its value is kept as written
    (`--set name=2024` is the name "2024", `--set filters.nsfw.source=off` the choice "off"),
    except null, which still clears an optional one."""
    model: type[BaseModel] | None = RunConfig
    parts = key.split(".")
    for i, part in enumerate(parts):
        info = model.model_fields.get(part) if model else None
        if info is None:
            return False
        if i == len(parts) - 1:
            return _is_text(info.annotation)
        model = _section_of(info.annotation)
    return False


def _parse_override(item: str) -> tuple[str, Any]:
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like key.path=value")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override {item!r} has an empty key")
    if not raw.strip():
        return key, ""
    if _takes_text(key) and raw.strip() not in ("null", "~"):
        return key, raw
    try:
        return key, yaml.safe_load(raw)
    except yaml.YAMLError as e:
        problem = str(getattr(e, "problem", None) or e).splitlines()[0]
        raise ConfigError(f"override {item!r}: the value is not valid YAML ({problem})") from None


def _set_dotted(tree: dict, key: str, value: Any, origin: str) -> None:
    node = tree
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{origin}: cannot set {key!r}: {part!r} is not a section")
        node = child
    node[parts[-1]] = value


def _format_errors(origin: str, err: ValidationError) -> str:
    lines = [f"{origin}: invalid run config"]
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "(top level)"
        if e["type"] == "extra_forbidden":
            lines.append(f"  {key}: unknown key")
        elif e["type"] == "missing":
            lines.append(f"  {key}: missing value")
        else:
            lines.append(f"  {key}: {e['msg']} (got {e.get('input')!r})")
    return "\n".join(lines)


def load_config(
    path: str | os.PathLike,
    overrides: Iterable[str] = (),
    environ: dict[str, str] | None = None,
) -> RunConfig:
    """Load a run config. Precedence: command-line overrides > environment > file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such config file")
    try:
        tree = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from e
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys")
    environ = os.environ if environ is None else environ
    for var, key in ENV_OVERRIDES.items():
        if environ.get(var):
            _set_dotted(tree, key, environ[var], f"{path} (environment {var})")
    for item in overrides:
        key, value = _parse_override(item)
        _set_dotted(tree, key, value, f"{path} (override {item!r})")
    try:
        cfg = RunConfig.model_validate(tree)
    except ValidationError as e:
        raise ConfigError(_format_errors(str(path), e)) from None
    apply_storage(cfg.storage)  # every filesystem opened from here on, and Ray workers started after
    return cfg


__all__ = ["ConfigError", "RunConfig", "Section", "load_config"]
