"""Evaluation protocols by name: how images are prepared and scored, so that figures are comparable.

- `native`: each checkpoint at its own resolution, images as generated; CLIP score is
  max(100 cos, 0) with the configured CLIP (torchmetrics' CLIPScore formula).
- `llamagen_t2i`: the protocol of LlamaGen's text-to-image table (GigaGAN's): generated and
  reference images centre-cropped to a square and resized with Lanczos to 256 px whatever the
  stage's resolution; FID on Inception-v3 features after clean-fid's resize; CLIP score is the
  mean raw cosine of OpenAI's ViT-B/32 between an image and its caption prefixed with
  "A photo depicts "; reference statistics from images or from a precomputed .npz of mu and
  sigma; 30,000 COCO captions.

Every metrics row records the protocol, the resolution images were measured at, how many
generated and reference images the figures rest on, and the feature extractor with the sha256 of
its weights; fewer images than the protocol asks for put a warning in the row and the log.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
from PIL import Image

log = logging.getLogger(__name__)

INCEPTION_DIM = 2048


@dataclass(frozen=True)
class Protocol:
    name: str
    resolution: int | None  # every image is measured at this size (None: as generated)
    clip_prefix: str  # put before each caption for CLIP score
    clip_formula: str  # "clamped_100": max(100 cos, 0); "raw_cosine": cos
    min_images: int  # fewer generated or reference images than this: a warning
    clip_model: str | None = None  # the CLIP the protocol prescribes (None: the configured one)

    def prepare(self, pixels: np.ndarray) -> np.ndarray:
        """(N, H, W, 3) uint8 as the protocol measures them."""
        if self.resolution is None:
            return pixels
        return np.stack([centre_crop_lanczos(p, self.resolution) for p in pixels])

    def clip_scores(self, cosines: np.ndarray) -> np.ndarray:
        if self.clip_formula == "raw_cosine":
            return cosines
        return np.maximum(100.0 * cosines, 0.0)

    def captions(self, prompts: list[str]) -> list[str]:
        return [self.clip_prefix + p for p in prompts]


PROTOCOLS = {
    # Below the feature dimension the covariance is rank-deficient and FID is dominated by bias.
    "native": Protocol("native", None, "", "clamped_100", INCEPTION_DIM),
    "llamagen_t2i": Protocol("llamagen_t2i", 256, "A photo depicts ", "raw_cosine", 30000, clip_model="ViT-B-32"),
}


def protocol(name: str) -> Protocol:
    if name not in PROTOCOLS:
        raise ValueError(f"unknown evaluation protocol {name!r}; known: {', '.join(PROTOCOLS)}")
    return PROTOCOLS[name]


def centre_crop_lanczos(pixels: np.ndarray, size: int) -> np.ndarray:
    """(H, W, 3) uint8 -> the centred square of side min(H, W), resized to size x size with PIL's Lanczos."""
    h, w = pixels.shape[:2]
    side = min(h, w)
    # torchvision's center_crop rounds the offsets to the nearest pixel
    top, left = round((h - side) / 2.0), round((w - side) / 2.0)
    square = Image.fromarray(pixels[top:top + side, left:left + side])
    return np.asarray(square.resize((size, size), Image.LANCZOS))


def row_fields(proto: Protocol, resolution: int, n_gen: int, n_ref: int | None, extractor: str | None,
               weights_sha256: str | None, clip_model: str, label: str = "") -> dict:
    """The fields every metrics row carries, with a warning when N is below what the protocol asks
    or the CLIP is not the one it prescribes."""
    fields = {"protocol": proto.name, "eval_resolution": proto.resolution or resolution, "n_gen": n_gen,
              "n_ref": n_ref, "feature_extractor": extractor, "feature_weights_sha256": weights_sha256,
              "clip_model": clip_model}
    problems = [f"{what} {n} < {proto.min_images}" for what, n in (("N_gen", n_gen), ("N_ref", n_ref))
                if n is not None and n < proto.min_images]
    if proto.clip_model and clip_model != proto.clip_model:
        problems.append(f"CLIP score with {clip_model}, not {proto.clip_model}")
    if problems:
        fields["warning"] = (f"not the {proto.name} protocol's conditions ({'; '.join(problems)}): "
                             "the figures are not comparable with published ones")
        log.warning("eval %s: %s", label, fields["warning"])
    return fields


# Reference statistics ------------------------------------------------------------------------------
@dataclass
class Gaussian:
    """Precomputed feature statistics: what a Frechet distance needs of a reference set."""

    mean: np.ndarray
    cov: np.ndarray
    count: int | None  # images they were computed from, when the file says


def read_reference_stats(path: str) -> Gaussian:
    """mu and sigma from an .npz as clean-fid and the ADM evaluation suite write them (keys `mu`,
    `sigma`; the image count from `n` or `count` when present)."""
    import io

    import fsspec

    with fsspec.open(path, "rb") as f:
        data = np.load(io.BytesIO(f.read()), allow_pickle=False)
    missing = [k for k in ("mu", "sigma") if k not in data.files]
    if missing:
        raise ValueError(f"{path}: no {' or '.join(missing)} in the reference statistics (keys: {data.files})")
    mu, sigma = np.asarray(data["mu"], np.float64), np.asarray(data["sigma"], np.float64)
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise ValueError(f"{path}: mu {mu.shape} and sigma {sigma.shape} do not describe one Gaussian")
    count = next((int(data[k]) for k in ("n", "count") if k in data.files), None)
    return Gaussian(mu, sigma, count)
