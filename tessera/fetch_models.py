"""`tessera fetch-models`: every model a run config names, fetched once into its models_root.

Runs never download: they find these models under models_root offline (tessera.models.fetch.locate),
and a run that needs one that is not there stops with an error naming it and this command.
"""
from __future__ import annotations

import logging
import os
import re

from tessera.config import RunConfig
from tessera.config.models import ModelSource
from tessera.models.fetch import FetchError, fetch, source_for, target_path
from tessera.models.refs import PREFIX

log = logging.getLogger(__name__)
_RUN_STAGE = re.compile(r"^([\w.-]+/)?stage[12]$")  # init_from naming a run's stage, not a file


def named_models(cfg: RunConfig, with_tiny: bool = False) -> list[tuple[str, str]]:
    """(config key, model name) for every model the config's enabled stages would load that can be
    fetched; `with_tiny` adds the `tiny:` ones, which are built, not fetched."""
    f = cfg.filters
    named: list[tuple[str, str | None]] = []
    scores = {name: getattr(f, name) for name in ("clip_score", "aesthetic", "nsfw", "watermark")}
    if f.dedup.enabled or any(scores[n].source != "off" for n in ("clip_score", "aesthetic", "nsfw")):
        named.append(("filters.clip.checkpoint", f.clip.checkpoint))
    for name in ("aesthetic", "nsfw", "watermark"):
        s = scores[name]
        if s.source == "compute" or (s.source == "metadata" and s.on_missing_column == "compute"):
            named.append((f"filters.{name}.weights", s.weights))
    if cfg.caption.enabled:
        named.append(("caption.model", cfg.caption.model))
    named += [("tokenize.vq", cfg.tokenize.vq), ("tokenize.text_encoder", cfg.tokenize.text_encoder)]
    for stage in ("stage1", "stage2"):
        t = getattr(cfg, stage)
        if t is not None:
            named += [(f"{stage}.text_encoder", t.text_encoder), (f"{stage}.vq", t.vq)]
            if t.init_from and not _RUN_STAGE.match(t.init_from):
                named.append((f"{stage}.init_from", t.init_from))
    if cfg.sample is not None:
        named += [("sample.checkpoint", cfg.sample.checkpoint), ("sample.vq", cfg.sample.vq),
                  ("sample.text_encoder", cfg.sample.text_encoder)]
    if cfg.eval is not None:
        e = cfg.eval
        named += [("eval.vq", e.vq), ("eval.text_encoder", e.text_encoder), ("eval.clip.checkpoint", e.clip.checkpoint),
                  ("eval.inception", e.inception), ("eval.tokenizer.vq", e.tokenizer.vq)]
    return [(key, ref) for key, ref in named
            if ref and (with_tiny or not ref.startswith(PREFIX)) and "://" not in ref]


def with_pins(cfg: RunConfig, pins: list[str]) -> RunConfig:
    """`cfg` with each NAME=SHA256 of `pins` (fetch-models --sha256) pinned in its model_sources: the
    config's own entry of that name gets the sum, else the built-in source of that name does."""
    sources = dict(cfg.model_sources)
    for pin in pins:
        name, _, digest = pin.partition("=")
        if not name or not digest:
            raise ValueError(f"--sha256 {pin!r}: give NAME=SHA256 (the model's name as the config writes it)")
        try:
            ModelSource(sha256=digest)
        except ValueError as e:
            raise ValueError(f"--sha256 {pin!r}: the sha256 must be 64 hex digits") from e
        entry = sources.get(name)
        sources[name] = entry.model_copy(update={"sha256": digest.lower()}) if entry else ModelSource(sha256=digest)
    return cfg.model_copy(update={"model_sources": sources})


def fetch_models(cfg: RunConfig) -> list[dict]:
    """Fetch what is missing; returns one row per model name. Raises FetchError listing the models
    that have no known source or failed, after trying every other one."""
    rows, problems, seen = [], [], set()
    for key, ref in named_models(cfg):
        if ref in seen:
            continue
        seen.add(ref)
        source = source_for(ref, cfg.model_sources)
        if source is None:
            if os.path.exists(target_path(ref, cfg.models_root)):
                rows.append({"key": key, "ref": ref, "action": "present", "path": target_path(ref, cfg.models_root)})
            else:
                problems.append(f"{key}: {ref!r} is not in models_root and has no known source; add it to "
                                "model_sources (url + sha256, hub, or open_clip) or put the file there")
            continue
        try:
            log.info("%s: %s", key, ref)
            rows.append({"key": key, **fetch(ref, source, cfg.models_root)})
        except (FetchError, OSError, ValueError) as e:
            problems.append(f"{key}: {ref!r}: {e}")
        except Exception as e:  # noqa: BLE001 - hub errors: report every model, not only the first
            problems.append(f"{key}: {ref!r}: {type(e).__name__}: {e}")
    for row in rows:
        log.info("%-24s %-8s %s", row["key"], row["action"], row["path"])
    if problems:
        raise FetchError("some models could not be fetched:\n  " + "\n  ".join(problems))
    return rows
