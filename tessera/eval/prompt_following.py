"""Prompt-following on the synthetic world, read from a generated image's pixels.

Every prompt of the synthetic world names a shape colour, a shape, a place and a background
colour. From the pixels alone (no model):
- each pixel takes the nearest palette colour;
- the background is the commonest colour of the border band;
- the shape colour is the commonest other colour (pixels of the background colour excluded);
- the picture must show exactly one shape: the shape-colour pixels' connected regions are
  counted, and exactly one may be of shape size, holding most of that colour's pixels. Scattered
  speckles read as no shape ("none"), two shapes as "several"; either way colour, place and
  shape are not credited;
- the place is where that region's centroid sits relative to the image centre;
- the shape is the template (square, circle, triangle with its apex up, cross) that overlaps the
  region best within its bounding box, if that overlap (intersection over union) is high enough.

`chance_floors` gives, per attribute, what the best constant answer would score on a prompt set:
a figure is worth what it exceeds its floor by.
"""
from __future__ import annotations

from collections import Counter

import numpy as np
from scipy import ndimage

ATTRIBUTES = ("color", "background", "place", "shape")
BORDER = 0.06  # width of the border band, as a fraction of the short side
MIN_SHAPE = 0.005  # a shape colour must cover at least this fraction of the image
DOMINANT = 0.7  # the one shape-sized region must hold this share of its colour's pixels
MIN_OVERLAP = 0.6  # the best template's intersection over union, below which no shape is read
CENTRE = 0.125  # |offset| of the centroid below this fraction of the side: "in the center"
CROSS_ARM = 1 / 3  # a cross's arm width as a share of its size (the demo draws r/3 each side of 2r)


def palette_labels(pixels: np.ndarray, palette: dict[str, tuple[int, int, int]]) -> tuple[np.ndarray, list[str]]:
    """(H, W) index of the nearest palette colour for every pixel, and the names in index order."""
    names = list(palette)
    colours = np.array([palette[n] for n in names], dtype=np.float32)
    d = ((pixels.astype(np.float32)[:, :, None, :] - colours[None, None]) ** 2).sum(-1)
    return d.argmin(-1), names


def _place(ys: np.ndarray, xs: np.ndarray, h: int, w: int) -> str:
    dx, dy = xs.mean() / w - 0.5, ys.mean() / h - 0.5
    if max(abs(dx), abs(dy)) < CENTRE:
        return "in the center"
    if abs(dx) >= abs(dy):
        return "on the left" if dx < 0 else "on the right"
    return "at the top" if dy < 0 else "at the bottom"


def _templates(h: int, w: int) -> dict[str, np.ndarray]:
    """Each shape filling an h x w box, sampled at pixel centres."""
    v, u = (np.mgrid[0:h, 0:w] + 0.5) / np.array([h, w])[:, None, None]
    arm = CROSS_ARM / 2
    return {"square": np.ones((h, w), bool),
            "circle": (u - 0.5) ** 2 + (v - 0.5) ** 2 <= 0.25,
            "triangle": np.abs(u - 0.5) <= v / 2,
            "cross": (np.abs(u - 0.5) <= arm) | (np.abs(v - 0.5) <= arm)}


def _shape(region: np.ndarray) -> str:
    ys, xs = np.nonzero(region)
    box = region[ys.min():ys.max() + 1, xs.min():xs.max() + 1]
    overlaps = {name: (box & t).sum() / (box | t).sum() for name, t in _templates(*box.shape).items()}
    best = max(overlaps, key=overlaps.get)
    return best if overlaps[best] >= MIN_OVERLAP else "none"


def single_shape(mask: np.ndarray) -> tuple[np.ndarray | None, str]:
    """The one shape-sized connected region of `mask`, or None with why ("none" or "several")."""
    regions, n = ndimage.label(mask)
    if n == 0:
        return None, "none"
    sizes = np.bincount(regions.ravel())[1:]
    big = np.flatnonzero(sizes >= MIN_SHAPE * mask.size)
    if len(big) > 1:
        return None, "several"
    if len(big) == 0 or sizes[big[0]] < DOMINANT * sizes.sum():
        return None, "none"
    return regions == big[0] + 1, ""


def read_picture(pixels: np.ndarray, palette: dict[str, tuple[int, int, int]]) -> dict[str, str]:
    """What a (H, W, 3) uint8 image shows: {color, background, place, shape} ("none" when no shape)."""
    labels, names = palette_labels(pixels, palette)
    h, w = labels.shape
    b = max(1, round(BORDER * min(h, w)))
    band = np.concatenate([labels[:b].ravel(), labels[-b:].ravel(), labels[:, :b].ravel(), labels[:, -b:].ravel()])
    background = int(np.bincount(band, minlength=len(names)).argmax())
    counts = np.bincount(labels.ravel(), minlength=len(names))
    counts[background] = 0
    color = int(counts.argmax())
    nothing = {"color": "none", "background": names[background], "place": "none", "shape": "none"}
    if counts[color] < MIN_SHAPE * h * w:
        return nothing
    region, why = single_shape(labels == color)
    if region is None:
        return {**nothing, "shape": why}
    ys, xs = np.nonzero(region)
    return {"color": names[color], "background": names[background], "place": _place(ys, xs, h, w),
            "shape": _shape(region)}


def chance_floors(truth: list[dict]) -> dict[str, float]:
    """Per attribute (and for all four together), the share of prompts the commonest answer fits:
    what a reader that ignores the image would score."""
    floors = {a: Counter(t[a] for t in truth).most_common(1)[0][1] / len(truth) for a in ATTRIBUTES}
    combos = Counter(tuple(t[a] for a in ATTRIBUTES) for t in truth)
    return {**floors, "all": combos.most_common(1)[0][1] / len(truth)}


def judge(seen: dict[str, str], truth: dict[str, str]) -> dict[str, bool]:
    """Per attribute, whether the image shows what the prompt asked for; `all` when every one does."""
    hits = {a: seen[a] == truth[a] for a in ATTRIBUTES}
    return {**hits, "all": all(hits.values())}
