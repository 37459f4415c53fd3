"""Prompt-following on the synthetic world, read from a generated image's pixels.

Every prompt of the synthetic world names a shape colour, a shape, a place and a background
colour. From the pixels alone (no model):
- each pixel takes the nearest palette colour;
- the background is the commonest colour of the border band;
- the shape colour is the commonest other colour (pixels of the background colour excluded);
- the place is where the shape-colour pixels' centroid sits relative to the image centre;
- the shape follows from how the shape-colour pixels fill their bounding box (square ~1, circle
  ~0.79, triangle and cross ~0.5) and, between triangle and cross, from how much of that mass
  lies in the box's upper half (a triangle's apex points up).
"""
from __future__ import annotations

import numpy as np

ATTRIBUTES = ("color", "background", "place", "shape")
BORDER = 0.06  # width of the border band, as a fraction of the short side
MIN_SHAPE = 0.005  # a shape colour must cover at least this fraction of the image
CENTRE = 0.125  # |offset| of the centroid below this fraction of the side: "in the center"


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


def _shape(mask: np.ndarray) -> str:
    ys, xs = np.nonzero(mask)
    box = mask[ys.min():ys.max() + 1, xs.min():xs.max() + 1]
    fill = box.mean()
    if fill > 0.9:
        return "square"
    if fill > 0.68:
        return "circle"
    upper = box[: box.shape[0] // 2].sum() / max(box.sum(), 1)
    return "triangle" if upper < 0.4 else "cross"


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
    if counts[color] < MIN_SHAPE * h * w:
        return {"color": "none", "background": names[background], "place": "none", "shape": "none"}
    mask = labels == color
    ys, xs = np.nonzero(mask)
    return {"color": names[color], "background": names[background], "place": _place(ys, xs, h, w),
            "shape": _shape(mask)}


def judge(seen: dict[str, str], truth: dict[str, str]) -> dict[str, bool]:
    """Per attribute, whether the image shows what the prompt asked for; `all` when every one does."""
    hits = {a: seen[a] == truth[a] for a in ATTRIBUTES}
    return {**hits, "all": all(hits.values())}
