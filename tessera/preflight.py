"""Preflight: what every command checks before Prefect or Ray starts, so that a mistake costs one
line and a few seconds instead of a failed run.

Each check raises PreflightError with one line naming the problem and what to do; the CLI prints
it and exits 2. The checks read and probe, and never start a flow: the config's model names, the
sections of the steps asked for, the source and its columns, a probe write to data_root and
runs_root (through fsspec, so object storage is probed the same way), every model a step loads,
the checkpoint a command reads, and the cluster a job is submitted to.
"""
from __future__ import annotations

import posixpath
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, field

import fsspec
import pyarrow.parquet as pq

from tessera.config import RunConfig
from tessera.config.steps import SECTIONS, has_section, runnable_steps
from tessera.config.train import SampleConfig
from tessera.fetch_models import named_models
from tessera.models.cache import cache_root
from tessera.models.fetch import ModelMissing, locate
from tessera.models.gpt_configs import GPT_CONFIGS
from tessera.models.refs import BUILDERS, PREFIX
from tessera.pipelines.intake import InputError, list_files

# The models each step loads, by the config key prefix fetch_models.named_models gives them.
MODEL_KEYS = {"curate": ("filters.", "caption.", "tokenize."), "stage1": ("stage1.",), "stage2": ("stage2.",),
              "sample": ("sample.",), "eval": ("eval.",)}


class PreflightError(Exception):
    """A run that cannot succeed as asked; the message is one line."""


@dataclass
class Plan:
    """What a command will do: the steps, and those left out for want of a config section."""
    steps: list[str]
    skipped: list[str] = field(default_factory=list)


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0]}" if text else type(error).__name__


# The config ---------------------------------------------------------------------------------------
def check_model_names(cfg: RunConfig) -> None:
    """Every generator name the config gives is one the model zoo builds (GPT-B, GPT-XL, ...)."""
    named = [(f"{s}.model", getattr(cfg, s).model) for s in ("stage1", "stage2", "sample", "eval")
             if getattr(cfg, s) is not None]
    for key, name in named:
        if name not in GPT_CONFIGS:
            raise PreflightError(f"{key}: unknown model {name!r}; choose from {', '.join(GPT_CONFIGS)}")


def plan_steps(cfg: RunConfig, asked: list[str] | None, config_path: str) -> Plan:
    """The steps to run: those asked for (each must have its section), or every step whose section
    the config has."""
    for step in asked or []:
        if not has_section(cfg, step):
            raise PreflightError(f"the step {step} was asked for, but {config_path} has no "
                                 f"`{SECTIONS[step]}` section")
    steps, skipped = runnable_steps(cfg, asked)
    return Plan(steps, skipped)


# Data -----------------------------------------------------------------------------------------
def check_source(cfg: RunConfig) -> list[str] | None:
    """The source exists and has the columns the config names (a synthetic one is made on the run).
    Returns the columns of a parquet source (None for the other kinds)."""
    src = cfg.source
    if src.synthetic is not None:
        return None
    try:
        if src.kind == "image_folder":
            fs, path = fsspec.core.url_to_fs(src.path)
            if not fs.isdir(path):
                raise PreflightError(f"source.path {src.path}: no such folder (source.kind is image_folder)")
            if src.image_folder.mapping:
                mapping = src.image_folder.mapping
                where = mapping if "://" in mapping or posixpath.isabs(mapping) else posixpath.join(path, mapping)
                mfs, mpath = fsspec.core.url_to_fs(where) if "://" in mapping else (fs, where)
                if not mfs.exists(mpath):
                    raise PreflightError(f"source.image_folder.mapping {mapping}: no such file")
            return None
        if src.kind == "webdataset":
            list_files(src.path, (".tar",))
            return None
        fs, files = list_files(src.path, (".parquet",))
        if src.kind == "hf_parquet":
            need = ((src.hf_parquet.image_column, "source.hf_parquet.image_column"),
                    (src.hf_parquet.caption_column, "source.hf_parquet.caption_column"))
        else:
            need = ((src.columns.url, "source.columns.url"), (src.columns.caption, "source.columns.caption"))
        with fs.open(files[0], "rb") as f:
            names = pq.read_schema(f).names
    except InputError as e:
        raise PreflightError(f"source.path {src.path}: {_first_line(e).split(': ', 1)[1]}") from None
    except PreflightError:
        raise
    except Exception as e:  # noqa: BLE001 - unreadable input (not parquet, no permission): one line
        raise PreflightError(f"source.path {src.path}: cannot be read ({_first_line(e)})") from None
    for column, key in need:
        if column not in names:
            raise PreflightError(f"source.path {files[0]} has no column {column!r} ({key}); "
                                 f"its columns: {', '.join(names[:20])}")
    return names


def check_writable(key: str, url: str) -> None:
    """A probe file written and removed under `url`: the folder can be created and written."""
    try:
        fs, path = fsspec.core.url_to_fs(url)
        probe = posixpath.join(path.rstrip("/"), f".tessera-probe-{uuid.uuid4().hex}")
        fs.makedirs(path, exist_ok=True)
        with fs.open(probe, "wb") as f:
            f.write(b"tessera preflight\n")
        fs.rm(probe)
    except Exception as e:  # noqa: BLE001 - whatever the filesystem says, in one line
        raise PreflightError(f"{key} {url} is not writable ({_first_line(e)})") from None


# Models ---------------------------------------------------------------------------------------
def needed_models(cfg: RunConfig, steps: list[str], columns: list[str] | None = None) -> list[tuple[str, str]]:
    """(config key, model reference) of every model the steps load, tiny ones included. A score
    read from the input's metadata needs its model only when the input lacks the column: when
    `columns` (a parquet source's) says so; a synthetic source carries every score column, and for
    the other kinds the score stage itself says when a model is missing."""
    if "sample" in steps and cfg.sample is None:  # `tessera sample` without a section: the defaults
        cfg = cfg.model_copy(update={"sample": SampleConfig()})
    prefixes = tuple(p for s in steps for p in MODEL_KEYS[s])
    named = [(k, ref) for k, ref in named_models(cfg, with_tiny=True) if k.startswith(prefixes)]
    for name in ("aesthetic", "nsfw", "watermark"):
        score = getattr(cfg.filters, name)
        if score.source == "metadata" and (columns is None or score.column in columns):
            named = [(k, ref) for k, ref in named if k != f"filters.{name}.weights"]
    return list(dict.fromkeys(named))


def check_models(cfg: RunConfig, steps: list[str], config_path: str, columns: list[str] | None = None) -> None:
    """Every model the steps load is under models_root (or built on demand, for tiny ones)."""
    missing, tiny = [], False
    for key, ref in needed_models(cfg, steps, columns):
        if ref.startswith(PREFIX):
            if ref[len(PREFIX):] not in BUILDERS:
                raise PreflightError(f"{key}: unknown tiny model {ref!r}; known: "
                                     + ", ".join(PREFIX + n for n in sorted(BUILDERS)))
            tiny = True
            continue
        try:
            locate(ref, cfg.models_root)
        except ModelMissing:
            missing.append(f"{key}={ref}")
    if tiny:  # built there on first use
        check_writable("models_root", cache_root(cfg.models_root))
    if missing:
        raise PreflightError(f"{len(missing)} model(s) not in models_root {cfg.models_root}: {', '.join(missing)}; "
                             f"fetch them with `tessera fetch-models {config_path}`")


# Other inputs -----------------------------------------------------------------------------------
def check_checkpoint(path: str) -> None:
    try:
        fs, local = fsspec.core.url_to_fs(path)
        found = fs.exists(local)
    except Exception as e:  # noqa: BLE001
        raise PreflightError(f"checkpoint {path}: cannot be read ({_first_line(e)})") from None
    if not found:
        raise PreflightError(f"checkpoint {path}: no such file or folder (runs_root/RUN/STAGE/checkpoints/step-N)")


def check_cluster(address: str, timeout: float = 5.0) -> None:
    """The cluster's job API answers (any HTTP status will do: authentication comes later)."""
    url = address.rstrip("/") + "/api/version"
    try:
        with urllib.request.urlopen(url, timeout=timeout):  # noqa: S310 - an http(s) address the user gave
            pass
    except urllib.error.HTTPError:
        return
    except (urllib.error.URLError, OSError, ValueError) as e:
        reason = getattr(e, "reason", e)
        raise PreflightError(f"the cluster at {address} does not answer ({reason}); is it up, and is "
                             "--address (RAY_API_SERVER_ADDRESS) its dashboard address?") from None


# Per command ------------------------------------------------------------------------------------
def writes(steps: list[str]) -> list[str]:
    """The roots the steps write under."""
    roots = []
    if {"curate", "eval"} & set(steps):
        roots.append("data_root")
    if {"stage1", "stage2", "sample", "eval"} & set(steps):
        roots.append("runs_root")
    return roots


def check_run(cfg: RunConfig, steps: list[str], config_path: str) -> None:
    """Everything a run of `steps` needs, in the order a user would fix it."""
    check_model_names(cfg)
    columns = check_source(cfg) if "curate" in steps else None
    for key in writes(steps):
        check_writable(key, getattr(cfg, key))
    check_models(cfg, steps, config_path, columns)
