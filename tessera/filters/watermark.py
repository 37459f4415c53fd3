"""Watermark probability (pwatermark): the LAION-5B detector on the image's pixels."""
from __future__ import annotations

import numpy as np
import torch

from tessera.filters.base import Batch, Needs, ThresholdFilter
from tessera.models.watermark import pwatermark


class WatermarkFilter(ThresholdFilter):
    name = "watermark"
    column = "pwatermark"
    higher_is_better = False
    fail_reason = "watermark"
    compute_needs = Needs.PIXELS

    def __init__(self, model: torch.nn.Module | None = None, image_size: int = 256, autocast: bool = False,
                 **kwargs):
        super().__init__(**kwargs)
        self.model = model
        self.image_size = image_size
        self.autocast = autocast

    def compute(self, batch: Batch) -> np.ndarray:
        with torch.autocast("cuda", torch.bfloat16, enabled=self.autocast):
            pixels = torch.from_numpy(batch.watermark_pixels).to(next(self.model.parameters()).device)
            return pwatermark(self.model, pixels).cpu().numpy()
