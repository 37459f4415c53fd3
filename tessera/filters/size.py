"""Size and aspect of the original image (before the download's resizing)."""
from __future__ import annotations

import numpy as np
import pandas as pd

from tessera.filters.base import Batch, Filter, Needs, keep_all


class SizeFilter(Filter):
    name = "size"
    needs = Needs.METADATA

    def __init__(self, min_side: int, max_aspect_ratio: float):
        self.min_side = min_side
        self.max_aspect_ratio = max_aspect_ratio

    def score(self, batch: Batch) -> dict[str, np.ndarray]:
        w, h = (pd.to_numeric(batch.meta[c], errors="coerce").to_numpy(dtype=np.float64) if c in batch.meta
                else np.full(len(batch), np.nan) for c in ("original_width", "original_height"))
        valid = (w > 0) & (h > 0)
        short = np.where(valid, np.minimum(w, h), np.nan)
        with np.errstate(divide="ignore", invalid="ignore"):
            aspect = np.where(valid, np.maximum(w, h) / np.minimum(w, h), np.nan)
        return {"short_side": short, "aspect_ratio": aspect}

    def decide(self, scores: pd.DataFrame) -> np.ndarray:
        short = scores["short_side"].to_numpy(dtype=np.float64)
        aspect = scores["aspect_ratio"].to_numpy(dtype=np.float64)
        reasons = keep_all(len(short))
        reasons[aspect > self.max_aspect_ratio] = "aspect_ratio"
        reasons[short < self.min_side] = "too_small"
        reasons[np.isnan(short) | np.isnan(aspect)] = "size_missing"
        return reasons

    def describe(self) -> dict:
        return {"min_side": self.min_side, "max_aspect_ratio": self.max_aspect_ratio}
