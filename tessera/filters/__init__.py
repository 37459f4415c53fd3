"""The filters, built from the `filters` config section, in the order that names drop reasons.

A sample failing several filters is dropped for the first one in ORDER. Exact copies, then
near-duplicates, are looked for among the samples every earlier filter kept, and the target count
applies last.
"""
from __future__ import annotations

import logging

from tessera.config.filters import FiltersConfig, ScoreFilterConfig
from tessera.filters.aesthetic import AestheticFilter
from tessera.filters.base import Batch, Filter, Needs, ThresholdFilter
from tessera.filters.caption import CaptionFilter
from tessera.filters.clip_score import ClipScoreFilter
from tessera.filters.dedup import ExactDuplicateFilter, NearDuplicateFilter
from tessera.filters.image import ImageFilter
from tessera.filters.nsfw import NsfwFilter
from tessera.filters.size import SizeFilter
from tessera.filters.watermark import WatermarkFilter

log = logging.getLogger(__name__)

ORDER = ("image", "caption", "size", "clip_score", "aesthetic", "watermark", "nsfw", "exact_duplicate",
         "near_duplicate")
BELOW_TARGET = "below_target"
SCORE_FILTERS = {"clip_score": ClipScoreFilter, "aesthetic": AestheticFilter,
                 "watermark": WatermarkFilter, "nsfw": NsfwFilter}


def score_configs(cfg: FiltersConfig) -> dict[str, ScoreFilterConfig]:
    return {name: getattr(cfg, name) for name in SCORE_FILTERS}


def resolve_sources(cfg: FiltersConfig, input_columns: set[str]) -> dict[str, dict]:
    """Where each enabled score comes from: {"source": compute|metadata|missing, "column": ...}.

    A metadata score whose column the input lacks is computed instead, or (on_missing_column:
    drop) left missing so that every sample is dropped as `<score>_missing`; either way it is said.
    """
    sources = {}
    for name, sub in score_configs(cfg).items():
        if sub.source == "off":
            continue
        if sub.source == "compute":
            sources[name] = {"source": "compute", "column": None}
        elif sub.column in input_columns:
            sources[name] = {"source": "metadata", "column": sub.column}
        elif sub.on_missing_column == "compute":
            log.warning("%s: the input has no %r column; computing the score with the model instead.",
                        name, sub.column)
            sources[name] = {"source": "compute", "column": None, "fallback_from": sub.column}
        else:
            log.warning("%s: the input has no %r column; every sample is dropped as %s_missing "
                        "(set filters.%s.on_missing_column: compute to compute it instead).",
                        name, sub.column, SCORE_FILTERS[name].column, name)
            sources[name] = {"source": "missing", "column": sub.column}
    return sources


def build_filters(cfg: FiltersConfig, sources: dict[str, dict], models: dict | None = None) -> list[Filter]:
    """The enabled filters in ORDER. `models` holds the loaded scorer models (score stage only)."""
    models = models or {}
    filters: list[Filter] = [ImageFilter()]
    if cfg.caption.enabled:
        filters.append(CaptionFilter(cfg.caption.min_words, cfg.caption.max_chars, cfg.caption.min_letter_fraction))
    if cfg.size.enabled:
        filters.append(SizeFilter(cfg.size.min_side, cfg.size.max_aspect_ratio))
    for name, sub in score_configs(cfg).items():
        if sub.source == "off" or name not in sources:
            continue
        column = sources[name]["column"] if sources[name]["source"] != "compute" else None
        kwargs = dict(threshold=sub.min if sub.min is not None else sub.max, metadata_column=column)
        if name == "aesthetic":
            kwargs["head"] = models.get("aesthetic")
        elif name == "nsfw":
            kwargs["head"] = models.get("nsfw")
        elif name == "watermark":
            kwargs.update(model=models.get("watermark"), image_size=cfg.watermark.image_size,
                          autocast=models.get("autocast", False))
        filters.append(SCORE_FILTERS[name](**kwargs))
    if cfg.dedup.exact:
        filters.append(ExactDuplicateFilter())
    if cfg.dedup.enabled:
        filters.append(NearDuplicateFilter(cfg.dedup.min_similarity))
    return filters


__all__ = ["BELOW_TARGET", "Batch", "Filter", "Needs", "ORDER", "ThresholdFilter", "build_filters",
           "resolve_sources", "score_configs"]
