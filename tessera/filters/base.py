"""What every filter is: what it needs, how it scores a batch, how a score becomes keep or drop.

`score(batch)` runs in the score stage (in model actors) and returns score columns.
`decide(scores)` runs in the select stage over the stored scores and returns, per sample, ""
(keep) or the reason to drop it. A NaN score is never a pass: it is dropped as `<score>_missing`.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import pandas as pd


class Needs(enum.Flag):
    METADATA = enum.auto()
    PIXELS = enum.auto()
    IMAGE_EMBEDDING = enum.auto()
    TEXT_EMBEDDING = enum.auto()


@dataclass
class Batch:
    """One batch of samples as the filters see it; row i of every field is sample i."""

    # key, caption, original_width, original_height and the carried input columns.
    meta: pd.DataFrame
    image_embedding: np.ndarray | None = None   # (N, D), L2-normalised
    text_embedding: np.ndarray | None = None    # (N, D), L2-normalised
    watermark_pixels: np.ndarray | None = None  # (N, H, W, 3) uint8, the watermark detector's input

    def __len__(self) -> int:
        return len(self.meta)


def keep_all(n: int) -> np.ndarray:
    return np.full(n, "", dtype=object)


class Filter:
    name: ClassVar[str]
    needs: Needs = Needs.METADATA

    def score(self, batch: Batch) -> dict[str, np.ndarray]:
        return {}

    def decide(self, scores: pd.DataFrame) -> np.ndarray:
        raise NotImplementedError

    def describe(self) -> dict:
        return {}


class ThresholdFilter(Filter):
    """One score per sample, kept on one side of a threshold.

    The score is computed (`compute`) or read from an input column (the metadata fast path).
    """

    column: ClassVar[str]
    higher_is_better: ClassVar[bool]
    fail_reason: ClassVar[str]
    compute_needs: ClassVar[Needs]

    def __init__(self, threshold: float | None = None, metadata_column: str | None = None):
        self.threshold = threshold
        self.metadata_column = metadata_column

    @property
    def needs(self) -> Needs:  # type: ignore[override]
        return Needs.METADATA if self.metadata_column else self.compute_needs

    @property
    def source(self) -> str:
        return f"metadata:{self.metadata_column}" if self.metadata_column else "computed"

    def compute(self, batch: Batch) -> np.ndarray:
        raise NotImplementedError

    def score(self, batch: Batch) -> dict[str, np.ndarray]:
        if self.metadata_column:
            if self.metadata_column in batch.meta:
                values = pd.to_numeric(batch.meta[self.metadata_column], errors="coerce")
                values = values.to_numpy(dtype=np.float64)
            else:
                values = np.full(len(batch), np.nan)
        else:
            values = np.asarray(self.compute(batch), dtype=np.float64)
        return {self.column: values}

    def passes(self, values: np.ndarray) -> np.ndarray:
        if self.threshold is None:
            return np.ones(len(values), dtype=bool)
        return values >= self.threshold if self.higher_is_better else values <= self.threshold

    def decide(self, scores: pd.DataFrame) -> np.ndarray:
        values = scores[self.column].to_numpy(dtype=np.float64)
        reasons = keep_all(len(values))
        missing = np.isnan(values)
        reasons[~missing & ~self.passes(np.nan_to_num(values))] = self.fail_reason
        reasons[missing] = f"{self.column}_missing"
        return reasons

    def threshold_for_fraction(self, values: np.ndarray, fraction: float) -> float:
        """The threshold that keeps the best `fraction` of the valid scores (ties kept together)."""
        valid = np.sort(values[~np.isnan(values)])
        if not len(valid):
            raise ValueError(f"{self.column}: no valid scores to choose a threshold from")
        if self.higher_is_better:
            valid = valid[::-1]
        n = max(1, int(np.ceil(fraction * len(valid))))
        return float(valid[n - 1])

    def describe(self) -> dict:
        return {"score": self.column, "threshold": self.threshold,
                "keep_if": ">=" if self.higher_is_better else "<=", "source": self.source}


class EmbeddingHeadFilter(ThresholdFilter):
    """A score from a small head on the CLIP image embedding (aesthetic, NSFW)."""

    compute_needs = Needs.IMAGE_EMBEDDING

    def __init__(self, head=None, **kwargs):
        super().__init__(**kwargs)
        self.head = head

    def compute(self, batch: Batch) -> np.ndarray:
        import torch

        with torch.inference_mode():
            return self.head(as_tensor(batch.image_embedding, self.head)).float().cpu().numpy()


def as_tensor(array: np.ndarray, module):
    import torch

    return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32)).to(next(module.parameters()).device)
