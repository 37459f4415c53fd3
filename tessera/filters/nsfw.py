"""NSFW probability (punsafe): LAION's CLIP-based detector head on the image embedding."""
from __future__ import annotations

import numpy as np
import torch

from tessera.filters.base import Batch, Needs, ThresholdFilter, as_tensor


class NsfwFilter(ThresholdFilter):
    name = "nsfw"
    column = "punsafe"
    higher_is_better = False
    fail_reason = "nsfw"
    compute_needs = Needs.IMAGE_EMBEDDING

    def __init__(self, head: torch.nn.Module | None = None, **kwargs):
        super().__init__(**kwargs)
        self.head = head

    @torch.inference_mode()
    def compute(self, batch: Batch) -> np.ndarray:
        return self.head(as_tensor(batch.image_embedding, self.head)).float().cpu().numpy()
