"""NSFW probability (punsafe): LAION's CLIP-based detector head on the image embedding."""
from __future__ import annotations

from tessera.filters.base import EmbeddingHeadFilter


class NsfwFilter(EmbeddingHeadFilter):
    name = "nsfw"
    column = "punsafe"
    higher_is_better = False
    fail_reason = "nsfw"
