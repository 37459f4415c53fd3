"""Samples whose image could not be read: missing from the shard, or not decodable."""
from __future__ import annotations

import numpy as np
import pandas as pd

from tessera.filters.base import Filter, Needs


class ImageFilter(Filter):
    name = "image"
    needs = Needs.PIXELS

    def decide(self, scores: pd.DataFrame) -> np.ndarray:
        # The score stage records why decoding failed in `error` ("" when it worked).
        return scores["error"].fillna("").to_numpy(dtype=object)
