"""CLIP image-text score: the cosine of the L2-normalised image and caption embeddings."""
from __future__ import annotations

import numpy as np

from tessera.filters.base import Batch, Needs, ThresholdFilter


class ClipScoreFilter(ThresholdFilter):
    name = column = "clip_score"
    higher_is_better = True
    fail_reason = "low_clip_score"
    compute_needs = Needs.IMAGE_EMBEDDING | Needs.TEXT_EMBEDDING

    def compute(self, batch: Batch) -> np.ndarray:
        return np.sum(batch.image_embedding * batch.text_embedding, axis=1)
