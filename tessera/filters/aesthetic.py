"""Aesthetic score: the LAION improved aesthetic predictor on the CLIP image embedding."""
from __future__ import annotations

from tessera.filters.base import EmbeddingHeadFilter


class AestheticFilter(EmbeddingHeadFilter):
    name = column = "aesthetic"
    higher_is_better = True
    fail_reason = "low_aesthetic"
