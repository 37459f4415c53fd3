"""Aesthetic score: the LAION improved aesthetic predictor on the CLIP image embedding."""
from __future__ import annotations

import numpy as np
import torch

from tessera.filters.base import Batch, Needs, ThresholdFilter, as_tensor


class AestheticFilter(ThresholdFilter):
    name = column = "aesthetic"
    higher_is_better = True
    fail_reason = "low_aesthetic"
    compute_needs = Needs.IMAGE_EMBEDDING

    def __init__(self, head: torch.nn.Module | None = None, **kwargs):
        super().__init__(**kwargs)
        self.head = head

    @torch.inference_mode()
    def compute(self, batch: Batch) -> np.ndarray:
        return self.head(as_tensor(batch.image_embedding, self.head)).float().cpu().numpy()
