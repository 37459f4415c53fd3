"""Caption rules: empty, too short, too long, or mostly not text (URLs, hashes, file names)."""
from __future__ import annotations

import numpy as np
import pandas as pd

from tessera.filters.base import Batch, Filter, Needs, keep_all


def letter_fraction(text: str) -> float:
    chars = [c for c in text if not c.isspace()]
    return sum(c.isalpha() for c in chars) / len(chars) if chars else 0.0


class CaptionFilter(Filter):
    name = "caption"
    needs = Needs.METADATA

    def __init__(self, min_words: int, max_chars: int, min_letter_fraction: float):
        self.min_words = min_words
        self.max_chars = max_chars
        self.min_letter_fraction = min_letter_fraction

    def score(self, batch: Batch) -> dict[str, np.ndarray]:
        captions = [c if isinstance(c, str) else "" for c in batch.meta["caption"]]
        return {
            "caption_chars": np.array([len(c.strip()) for c in captions], dtype=np.int64),
            "caption_words": np.array([len(c.split()) for c in captions], dtype=np.int64),
            "caption_letter_fraction": np.array([letter_fraction(c) for c in captions], dtype=np.float64),
        }

    def decide(self, scores: pd.DataFrame) -> np.ndarray:
        chars = scores["caption_chars"].to_numpy()
        words = scores["caption_words"].to_numpy()
        letters = scores["caption_letter_fraction"].to_numpy(dtype=np.float64)
        reasons = keep_all(len(chars))
        # Later assignments win: the most basic failure names the reason.
        reasons[letters < self.min_letter_fraction] = "caption_not_text"
        reasons[chars > self.max_chars] = "caption_too_long"
        reasons[words < self.min_words] = "caption_too_short"
        reasons[chars == 0] = "caption_empty"
        return reasons

    def describe(self) -> dict:
        return {"min_words": self.min_words, "max_chars": self.max_chars,
                "min_letter_fraction": self.min_letter_fraction}
