"""Fréchet distances from mergeable feature moments, and Inception-v3 features the clean-fid way.

A worker keeps, per feature set, the sum of its feature vectors, the sum of their outer products
and their count (`Moments`): these add across shards and workers, and give exactly the mean and
unbiased covariance a single pass would (torchmetrics keeps the same three states). The distance
itself is written here (see `frechet_distance` for why) and applies to any features: FID on
Inception-v3 pool features, or the "CLIP-feature Fréchet distance" on CLIP image embeddings,
which is a different number and is never called FID.

Images reach Inception as clean-fid gives them: each channel resized as a float image to 299x299
with PIL's antialiased bicubic (`clean_resize` equals clean-fid's resizer exactly), and those
floats, not rounded, normalised to (x - 128) / 128 for the first convolution. The network is
torch-fidelity's Inception-v3 port (the layers of clean-fid's TorchScript file, with the weights in
a plain state dict); its extractor accepts uint8 only, so the float image is handed to its first
convolution directly (`InceptionFeatures`). (Resizing the RGB image as uint8 instead would differ
by far more: PIL rounds and clips between its horizontal and vertical passes, which shifts sharp
edges by up to ~17 levels.)
"""
from __future__ import annotations

import hashlib
import io
import posixpath
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

INCEPTION_SIZE = 299
INCEPTION_FEATURES = "2048"
INCEPTION_LOGITS = "logits_unbiased"


@dataclass
class Moments:
    """Sum, sum of outer products and count of a set of feature vectors (float64)."""

    total: np.ndarray
    outer: np.ndarray
    count: int

    @classmethod
    def zeros(cls, dim: int) -> "Moments":
        return cls(np.zeros(dim), np.zeros((dim, dim)), 0)

    @classmethod
    def of(cls, features: np.ndarray) -> "Moments":
        f = np.asarray(features, dtype=np.float64)
        if f.ndim != 2:
            raise ValueError(f"expected features (N, D), got shape {f.shape}")
        return cls(f.sum(0), f.T @ f, len(f))

    def __add__(self, other: "Moments") -> "Moments":
        if self.total.shape != other.total.shape:
            raise ValueError(f"cannot merge moments of {self.total.shape[0]} and {other.total.shape[0]} dims")
        return Moments(self.total + other.total, self.outer + other.outer, self.count + other.count)

    def update(self, features: np.ndarray) -> "Moments":
        return self + Moments.of(features)

    @property
    def mean(self) -> np.ndarray:
        return self.total / self.count

    @property
    def cov(self) -> np.ndarray:
        """Unbiased (n - 1) covariance, as np.cov and torchmetrics compute it."""
        if self.count < 2:
            raise ValueError(f"a covariance needs at least 2 feature vectors, got {self.count}")
        mu = self.mean
        return (self.outer - self.count * np.outer(mu, mu)) / (self.count - 1)

    def to_bytes(self) -> bytes:
        buf = io.BytesIO()
        np.savez(buf, total=self.total, outer=self.outer, count=np.int64(self.count))
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> "Moments":
        z = np.load(io.BytesIO(data))
        return cls(z["total"], z["outer"], int(z["count"]))


def merge(moments: list[Moments]) -> Moments:
    if not moments:
        raise ValueError("no feature moments to merge")
    out = moments[0]
    for m in moments[1:]:
        out = out + m
    return out


def _sqrt_psd(s: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((s + s.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance(a: Moments, b: Moments) -> float:
    """||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^1/2) between the Gaussians of two feature sets.

    Tr (S_a S_b)^1/2 is the sum of the singular values of S_a^1/2 S_b^1/2 (square roots by
    symmetric eigendecomposition). torch-fidelity and torchmetrics take square roots of the
    eigenvalues of the non-symmetric S_a S_b instead; on the rank-deficient covariances of sets
    smaller than the feature dimension (2048 for Inception) the square root magnifies the round-off
    in the ~zero eigenvalues into errors of ~1e-2 (identical sets do not give 0). The figures agree
    otherwise (tests).
    """
    mu = a.mean - b.mean
    sa, sb = a.cov, b.cov
    tr_covmean = np.linalg.svd(_sqrt_psd(sa) @ _sqrt_psd(sb), compute_uv=False).sum()
    return float(mu @ mu + np.trace(sa) + np.trace(sb) - 2 * tr_covmean)


# Inception-v3 features -----------------------------------------------------------------------------
def clean_resize(pixels: np.ndarray, size: int = INCEPTION_SIZE) -> np.ndarray:
    """(N, H, W, 3) uint8 -> (N, size, size, 3) float32 in [0, 255]: each channel resized as a float
    image with PIL's antialiased bicubic, as clean-fid's "clean" mode does."""
    def channel(c: np.ndarray) -> np.ndarray:
        return np.asarray(Image.fromarray(c.astype(np.float32), mode="F").resize((size, size), Image.BICUBIC))

    return np.stack([np.stack([channel(p[:, :, i]) for i in range(3)], axis=-1) for p in pixels]).clip(0, 255)


def sha256_of(path: str) -> str:
    import fsspec

    h = hashlib.sha256()
    with fsspec.open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def weights_sha256(path: str) -> str:
    """The sha256 of a weights file; of a folder (a model saved as several files), the sha256 of
    its files' relative paths and digests, one `path  digest` line each in sorted order."""
    import fsspec

    fs, root = fsspec.core.url_to_fs(path)
    if not fs.isdir(root):
        return sha256_of(path)
    files = sorted(f for f in fs.find(root) if not fs.isdir(f))
    lines = [f"{posixpath.relpath(f, root)}  {sha256_of(fs.unstrip_protocol(f))}\n" for f in files]
    return hashlib.sha256("".join(lines).encode()).hexdigest()


def check_sha256(path: str, expected: str) -> str:
    """The file's sha256; raises if it does not start with `expected` (a full digest or a prefix)."""
    digest = sha256_of(path)
    if not digest.startswith(expected.lower()):
        raise ValueError(f"{path}: sha256 {digest} does not match the pinned {expected}; "
                         "these are not the Inception weights the figures are defined with")
    return digest


def _check_weights(path: str) -> None:
    """torch-fidelity loads the file with a full unpickler; open it with weights_only=True first,
    so a file holding anything but tensors is refused before it gets there."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise FileNotFoundError(f"Inception weights {path} do not exist") from None
    except Exception as e:  # noqa: BLE001 - unpickling errors come in many types
        raise ValueError(f"Inception weights {path} are not a plain state dict of tensors: {e}") from None
    if not isinstance(state, dict) or "fc.weight" not in state:
        raise ValueError(f"{path} is not torch-fidelity's Inception-v3 state dict (no fc.weight)")


class InceptionFeatures:
    """torch-fidelity's Inception-v3 (the one torchmetrics uses) with its weights loaded from a path."""

    def __init__(self, weights: str, device: str = "cpu", logits: bool = False, feature: str = INCEPTION_FEATURES,
                 sha256: str | None = None):
        """`feature`: the pool features FID uses ("2048"), or an earlier layer's ("64", "192", "768");
        `sha256`: the weights' digest or its first characters, checked before loading."""
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

        if sha256:
            check_sha256(weights, sha256)
        _check_weights(weights)
        self.names = [feature] + ([INCEPTION_LOGITS] if logits else [])
        self.model = FeatureExtractorInceptionV3("inception-v3-compat", self.names,
                                                 feature_extractor_weights_path=weights).to(device)
        self.device = device

    @torch.inference_mode()
    def __call__(self, pixels: np.ndarray) -> dict[str, np.ndarray]:
        """(N, H, W, 3) uint8 -> {"2048": (N, 2048)[, "logits_unbiased": (N, 1008)]}, keyed by the feature."""
        resized = torch.from_numpy(clean_resize(pixels)).permute(0, 3, 1, 2).contiguous().to(self.device)

        def float_input(module, args):  # what clean-fid feeds its first convolution
            return ((resized.to(args[0].dtype) - 128) / 128,)

        hook = self.model.Conv2d_1a_3x3.register_forward_pre_hook(float_input)
        try:  # the extractor checks for uint8 at 299x299 (its own resize is then a no-op) and is bypassed at once
            out = self.model(resized.round().to(torch.uint8))
        finally:
            hook.remove()
        return {name: t.double().cpu().numpy() for name, t in zip(self.names, out)}


def save_random_inception(path: str, seed: int = 0) -> None:
    """An Inception-v3 with random weights in the extractor's file format: for tests, offline."""
    from unittest import mock

    from torch_fidelity import feature_extractor_inceptionv3 as fe

    torch.manual_seed(seed)
    with mock.patch.object(fe.FeatureExtractorInceptionV3, "load_state_dict", lambda self, *a, **k: None), \
            mock.patch.object(fe, "load_state_dict_from_url", lambda *a, **k: {}):
        model = fe.FeatureExtractorInceptionV3("inception-v3-compat", [INCEPTION_FEATURES])
    # Untrained convolutions shrink activations layer by layer to ~1e-7; batch-norm statistics
    # measured on a few noise images keep every layer near unit scale, so features differ visibly.
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # a plain average over the calibration batch
    model.train()
    with torch.no_grad():
        model(torch.randint(0, 256, (1, 3, INCEPTION_SIZE, INCEPTION_SIZE), dtype=torch.uint8))
    torch.save(model.state_dict(), path)


def inception_score(logits: np.ndarray, splits: int = 10) -> tuple[float, float]:
    """Inception score (mean, std over splits) from Inception's unbiased logits, by torch-fidelity."""
    from torch_fidelity.metric_isc import KEY_METRIC_ISC_MEAN, KEY_METRIC_ISC_STD, isc_features_to_metric

    out = isc_features_to_metric(torch.from_numpy(logits), splits=min(splits, len(logits)))
    return float(out[KEY_METRIC_ISC_MEAN]), float(out[KEY_METRIC_ISC_STD])


def precision_recall(generated: np.ndarray, reference: np.ndarray, neighborhood: int = 3) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al.) on features, by torch-fidelity."""
    from torch_fidelity.metric_prc import calculate_precision_recall_part

    p, r = calculate_precision_recall_part(torch.from_numpy(generated).float(), torch.from_numpy(reference).float(),
                                           neighborhood, 10000)
    return float(p), float(r)
