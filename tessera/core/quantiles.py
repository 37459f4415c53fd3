"""Order statistics over sharded rows without gathering the rows: KLL sketches, then an exact settle.

Each shard sketches its values (Apache DataSketches KLL, `kll_doubles_sketch`); the sketches merge in
memory that depends on k, not on the number of rows. A merged sketch answers "the value at rank r"
within a normalized rank error: `kll_doubles_sketch.get_normalized_rank_error(k, False)`, 1.33% at
k=200, 0.35% at k=800, with 99% confidence (a sketch that holds no more than k items is exact).

`settle` turns that into the exact answer: the sketch gives a window of values that holds rank r
(widened by the rank error); one pass counts, per shard, the rows below the window and in it. Once the
window holds at most `max_gather` rows, they are gathered and the r-th row is read off exactly; until
then the window's rows are sketched again, which narrows it by about 1/error each round. A window that
turns out to miss rank r (the 1% the confidence leaves) is widened and tried again.

Rows are ordered by (value, key), ascending: callers pass "badness" (the score negated where higher is
better), so rank 1 is the best row and ties go to the lowest key. A missing value is +inf (ranked last).
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
from datasketches import kll_doubles_sketch

log = logging.getLogger(__name__)


def rank_error(k: int) -> float:
    """The normalized rank error of a KLL sketch with parameter k (single-sided, 99% confidence)."""
    return kll_doubles_sketch.get_normalized_rank_error(k, False)


def sketch(values: np.ndarray, k: int) -> bytes:
    """The serialized sketch of the finite values (sketches are not picklable; bytes are)."""
    s = kll_doubles_sketch(k)
    finite = values[np.isfinite(values)]
    if len(finite):
        s.update(np.ascontiguousarray(finite, dtype=np.float64))
    return s.serialize()


def merge(blobs, k: int) -> kll_doubles_sketch:
    out = kll_doubles_sketch(k)
    for blob in blobs:
        if blob is not None:
            out.merge(kll_doubles_sketch.deserialize(blob))
    return out


def in_window(values: np.ndarray, keys: np.ndarray, lo: float, hi: float, k: int, gather: bool) -> dict:
    """One shard's answer to a window query: rows below it, rows in it, and either the rows in it
    (value, key) or a sketch of their values."""
    below = values < lo
    inside = (values >= lo) & (values <= hi)
    out = {"below": int(below.sum()), "inside": int(inside.sum())}
    if gather:
        out["values"] = values[inside]
        out["keys"] = keys[inside].astype(object)
    else:
        out["sketch"] = sketch(values[inside], k)
    return out


class Tally:
    """The shards' answers to one window query, summed as they arrive (none is kept)."""

    def __init__(self, k: int):
        self.k, self.below, self.inside = k, 0, 0
        self.sketch: kll_doubles_sketch | None = None
        self.values: list[np.ndarray] = []
        self.keys: list[np.ndarray] = []

    def add(self, part: dict) -> None:
        self.below += part["below"]
        self.inside += part["inside"]
        if "values" in part:
            self.values.append(part["values"])
            self.keys.append(part["keys"])
        else:
            self.sketch = self.sketch or kll_doubles_sketch(self.k)
            self.sketch.merge(kll_doubles_sketch.deserialize(part["sketch"]))

    def result(self) -> dict:
        out = {"below": self.below, "inside": self.inside}
        if self.sketch is None:
            out["values"] = np.concatenate(self.values) if self.values else np.zeros(0)
            out["keys"] = np.concatenate(self.keys) if self.keys else np.zeros(0, dtype=object)
        else:
            out["sketch"] = self.sketch
        return out


@dataclass
class Problem:
    """Find the row of rank `rank` (1-based) among `total` rows, `finite` of them with finite values
    summarized by `sketch`."""

    rank: int
    total: int
    sketch: kll_doubles_sketch
    lo: float = -math.inf      # a window known to hold the rank,
    hi: float = math.inf
    below: int = 0             # and the number of rows below it
    widen: float = 1.0
    answer: tuple[float, str] | None = field(default=None)

    def next_window(self, max_gather: int) -> tuple[float, float, bool]:
        n = self.sketch.n
        r = self.rank - self.below  # the rank within the window
        if r > n:  # past every finite value in the window: the rank lies among the +inf rows
            return math.inf, math.inf, True
        eps = (rank_error(self.sketch.k) * self.widen if self.sketch.is_estimation_mode() else 0.0) + 1.0 / n
        lo_rank, hi_rank = max(0.0, (r - 1) / n - eps), min(1.0, r / n + eps)
        lo = self.lo if lo_rank == 0.0 else max(self.lo, self.sketch.get_quantile(lo_rank))
        hi = self.hi if hi_rank == 1.0 else min(self.hi, self.sketch.get_quantile(hi_rank))
        # Gather when few rows are left, or when the window cannot narrow (its values tie).
        stuck = lo == hi or (lo, hi) == (self.lo, self.hi)
        return lo, hi, stuck or (hi_rank - lo_rank) * n <= max_gather

    def update(self, lo: float, hi: float, got: dict) -> None:
        if not got["below"] < self.rank <= got["below"] + got["inside"]:
            self.widen *= 4  # the sketch's window missed (rare): ask again, wider
            return
        if "values" in got:
            order = np.lexsort((got["keys"], got["values"]))
            pick = order[self.rank - got["below"] - 1]
            self.answer = (float(got["values"][pick]), str(got["keys"][pick]))
        else:
            self.lo, self.hi, self.below, self.sketch, self.widen = lo, hi, got["below"], got["sketch"], 1.0


def settle(problems: dict[str, Problem], query: Callable[[dict], dict], max_gather: int,
           max_rounds: int = 30) -> dict[str, tuple[float, str]]:
    """The exact (value, key) at each problem's rank. `query({name: (lo, hi, gather)})` runs one pass
    over the shards and returns {name: the shards' answers summed} (see `in_window` and `Tally`)."""
    for rnd in range(max_rounds):
        open_ = {name: p for name, p in problems.items() if p.answer is None}
        if not open_:
            break
        windows = {name: p.next_window(max_gather) for name, p in open_.items()}
        answers = query(windows)
        for name, p in open_.items():
            lo, hi, gather = windows[name]
            if gather and answers[name]["inside"] > 2 * max_gather:
                log.warning("%s: %d rows tie near rank %d; gathering them all to settle it.",
                            name, answers[name]["inside"], p.rank)
            p.update(lo, hi, answers[name])
    else:
        raise RuntimeError(f"could not settle {sorted(n for n, p in problems.items() if p.answer is None)} "
                           f"in {max_rounds} rounds")
    return {name: p.answer for name, p in problems.items()}
