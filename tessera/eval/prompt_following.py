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
  region best, both scaled to one raster over the region's bounding box, if that overlap is high
  enough.

Generated images come out of the tokenizer's decoder, which coarsens shapes (a colour-mosaic VQ
turns a small circle into a few blocks). `calibrated_templates` therefore fits the templates and
the overlap threshold on pictures of each shape passed through the VQ (encode, decode) at the
resolution being read; without a VQ the templates are the drawn shapes themselves.

`chance_floors` gives, per attribute, what the best constant answer would score on a prompt set:
a figure is worth what it exceeds its floor by.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np
from PIL import Image
from scipy import ndimage

from tessera.eval.tokenizer_eval import reconstruct

ATTRIBUTES = ("color", "background", "place", "shape")
SHAPES = ("square", "circle", "triangle", "cross")
BORDER = 0.06  # width of the border band, as a fraction of the short side
MIN_SHAPE = 0.005  # a shape colour must cover at least this fraction of the image
DOMINANT = 0.7  # the one shape-sized region must hold this share of its colour's pixels
MIN_OVERLAP = 0.6  # the drawn templates' overlap below which no shape is read
CENTRE = 0.125  # |offset| of the centroid below this fraction of the side: "in the center"
CROSS_ARM = 1 / 3  # a cross's arm width as a share of its size (the demo draws r/3 each side of 2r)
RASTER = 16  # a region and the templates are compared on RASTER x RASTER cells over its bounding box
# Calibration pictures: the demo's shapes have a half-size of 15-29% of the short side and sit up
# to 9% of the side away from a place's anchor.
HALF_SIZES = (0.15, 0.29)
SHIFT = 0.09
ANCHORS = ((0.5, 0.5), (0.25, 0.5), (0.75, 0.5), (0.5, 0.25), (0.5, 0.75))
CALIBRATION_PER_SHAPE = 16
# Names how images are read: part of the evaluation fingerprint, so rows read another way are redone.
READER = "one shape; templates calibrated through the VQ"


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


def drawn_shape(shape: str, h: int, w: int) -> np.ndarray:
    """The shape filling an h x w box, sampled at pixel centres."""
    v, u = (np.mgrid[0:h, 0:w] + 0.5) / np.array([h, w])[:, None, None]
    arm = CROSS_ARM / 2
    masks = {"square": lambda: np.ones((h, w), bool),
             "circle": lambda: (u - 0.5) ** 2 + (v - 0.5) ** 2 <= 0.25,
             "triangle": lambda: np.abs(u - 0.5) <= v / 2,
             "cross": lambda: (np.abs(u - 0.5) <= arm) | (np.abs(v - 0.5) <= arm)}
    return masks[shape]()


def box_raster(region: np.ndarray) -> np.ndarray:
    """The share of each of RASTER x RASTER cells over the region's bounding box that it covers."""
    ys, xs = np.nonzero(region)
    box = region[ys.min():ys.max() + 1, xs.min():xs.max() + 1].astype(np.float32)
    return np.asarray(Image.fromarray(box, mode="F").resize((RASTER, RASTER), Image.BOX)).clip(0, 1)


@dataclass(frozen=True)
class ShapeTemplates:
    """Occupancy rasters of known shapes; a region reads as the shape of the raster it overlaps
    most (ties: the shape most of the tied rasters show), unless that overlap is below `min_overlap`."""

    rasters: np.ndarray  # (M, RASTER, RASTER)
    shapes: tuple[str, ...]  # the shape each raster shows
    min_overlap: float

    @classmethod
    def drawn(cls) -> ShapeTemplates:
        return cls(np.stack([box_raster(drawn_shape(s, 8 * RASTER, 8 * RASTER)) for s in SHAPES]), SHAPES, MIN_OVERLAP)

    def overlaps(self, raster: np.ndarray) -> np.ndarray:
        return np.minimum(self.rasters, raster).sum((1, 2)) / np.maximum(self.rasters, raster).sum((1, 2)).clip(1e-9)

    def read(self, raster: np.ndarray) -> str:
        scores = self.overlaps(raster)
        best = scores.max()
        if best < self.min_overlap:
            return "none"
        tied = Counter(s for s, v in zip(self.shapes, scores) if v >= best - 1e-6)
        return tied.most_common(1)[0][0]


DRAWN = ShapeTemplates.drawn()


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


def shape_region(pixels: np.ndarray, palette: dict[str, tuple[int, int, int]]) -> tuple[dict[str, str], np.ndarray | None]:
    """What the picture shows but the shape, and the one shape's raster (`box_raster`; None when
    there is no one shape: then `shape` is already "none" or "several")."""
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
        return nothing, None
    region, why = single_shape(labels == color)
    if region is None:
        return {**nothing, "shape": why}, None
    ys, xs = np.nonzero(region)
    raster = box_raster(region)
    return {"color": names[color], "background": names[background], "place": _place(ys, xs, h, w)}, raster


def read_picture(pixels: np.ndarray, palette: dict[str, tuple[int, int, int]],
                 templates: ShapeTemplates = DRAWN) -> dict[str, str]:
    """What a (H, W, 3) uint8 image shows: {color, background, place, shape} ("none" when no shape)."""
    seen, raster = shape_region(pixels, palette)
    if raster is None:
        return seen
    return {**seen, "shape": templates.read(raster)}


# Templates calibrated through a tokenizer -----------------------------------------------------------
def calibration_pictures(resolution: int, palette: dict[str, tuple[int, int, int]], per_shape: int = CALIBRATION_PER_SHAPE,
                         seed: int = 0) -> tuple[np.ndarray, list[str]]:
    """`per_shape` square pictures of each shape, of the demo's sizes and places, in palette colours."""
    rng = np.random.default_rng(seed)
    colours = list(palette.values())
    pictures, shapes = [], []
    for shape in SHAPES:
        for _ in range(per_shape):
            fg, bg = rng.choice(len(colours), 2, replace=False)
            img = np.empty((resolution, resolution, 3), np.uint8)
            img[:] = colours[bg]
            r = round(resolution * rng.uniform(*HALF_SIZES))
            ax, ay = ANCHORS[rng.integers(len(ANCHORS))]
            cx = round(resolution * (ax + rng.uniform(-SHIFT, SHIFT)))
            cy = round(resolution * (ay + rng.uniform(-SHIFT, SHIFT)))
            mask = np.zeros((resolution + 4 * r, resolution + 4 * r), bool)  # room for a shape over the edge
            mask[cy + r:cy + 3 * r, cx + r:cx + 3 * r] = drawn_shape(shape, 2 * r, 2 * r)
            img[mask[2 * r:2 * r + resolution, 2 * r:2 * r + resolution]] = colours[fg]
            pictures.append(img)
            shapes.append(shape)
    return np.stack(pictures), shapes


def fit_templates(pictures: np.ndarray, shapes: list[str], palette: dict[str, tuple[int, int, int]]) -> ShapeTemplates:
    """Templates from pictures of known shapes: the raster of every picture that reads as one
    shape, and as threshold the lowest overlap any of them has with its nearest other raster
    (leave one out): every calibration shape would be read."""
    rasters, kept = [], []
    for img, shape in zip(pictures, shapes):
        _, raster = shape_region(img, palette)
        if raster is not None:
            rasters.append(raster)
            kept.append(shape)
    lost = [s for s in dict.fromkeys(shapes) if s not in kept]
    if lost:
        raise ValueError(f"no calibration picture of {', '.join(lost)} reads as one shape; cannot fit templates")
    bank = ShapeTemplates(np.stack(rasters), tuple(kept), 0.0)
    nearest = [np.delete(bank.overlaps(r), i).max() for i, r in enumerate(rasters)]
    return ShapeTemplates(bank.rasters, bank.shapes, float(min(nearest)))


def calibrated_templates(vq, resolution: int, palette: dict[str, tuple[int, int, int]], batch_size: int = 16,
                         per_shape: int = CALIBRATION_PER_SHAPE) -> ShapeTemplates:
    """Templates fitted on calibration pictures passed through `vq` (encode, decode) at `resolution`."""
    pictures, shapes = calibration_pictures(resolution, palette, per_shape)
    recon, _ = reconstruct(vq, pictures, batch_size)
    return fit_templates(recon, shapes, palette)


def templates_to_bytes(t: ShapeTemplates) -> bytes:
    import io

    buf = io.BytesIO()
    np.savez(buf, rasters=t.rasters, shapes=np.array(t.shapes), min_overlap=np.float64(t.min_overlap))
    return buf.getvalue()


def templates_from_bytes(data: bytes) -> ShapeTemplates:
    import io

    z = np.load(io.BytesIO(data))
    return ShapeTemplates(z["rasters"], tuple(str(s) for s in z["shapes"]), float(z["min_overlap"]))


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
