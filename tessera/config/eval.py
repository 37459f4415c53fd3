"""The `eval` section: evaluate generator checkpoints on a prompt set, and the tokenizer on held-out images."""
from __future__ import annotations

from typing import Literal

from pydantic import model_validator

from tessera.config.base import Resolution, Section
from tessera.config.filters import ClipModelConfig


class TokenizerEvalConfig(Section):
    enabled: bool = True
    vq: str | None = None  # None: the sampling VQ (eval.vq)
    # Held-out images: a glob of image files (local or fsspec); None: the prompt set's `image` column.
    images: str | None = None
    # Codebook usage counts every code of every image: N images at grid g show at most N g^2 of
    # the codebook's entries (64 images at 256px can show at most all 16,384 once), so a usage
    # figure needs many times that; rows report `usage_cap`. LlamaGen's 97% is over 50,000 images.
    max_images: int = 1000  # at most this many held-out images
    resolutions: list[Resolution] = [256, 512]  # each image is encoded and decoded at these sides
    batch_size: int = 8  # images per VQ call


class EvalConfig(Section):
    # How images are prepared and scored (tessera.eval.protocols): "native" (each checkpoint at its
    # own resolution, CLIP score max(100 cos, 0)) or "llamagen_t2i" (LlamaGen's published
    # text-to-image protocol: centre crop and Lanczos to 256, clean-fid's Inception pipeline, raw
    # cosine of OpenAI's ViT-B-32 with the prefix "A photo depicts ", 30k COCO captions). Set
    # clip.model to ViT-B-32 with OpenAI's weights for it: rows scored with another CLIP say so.
    protocol: Literal["native", "llamagen_t2i"] = "native"
    # The prompt set: a parquet with a `prompt` column and optionally `image` (a reference image
    # path or URL) and truth columns. Required, except in the demo, which writes the synthetic
    # world's held-out prompts (with their known truth for prompt-following) and points here.
    prompts: str | None = None
    synthetic_prompts: int = 24  # how many held-out prompts the demo writes when `prompts` is None
    max_prompts: int | None = None  # evaluate only the first N prompts (None: all)
    images_per_prompt: int = 2  # samples per prompt
    # Reference images for FID: a glob of image files; None: the prompt set's `image` column.
    reference: str | None = None
    # Precomputed reference statistics for FID instead of reference images: an .npz with `mu` and
    # `sigma` of Inception pool features (as clean-fid and the ADM evaluation suite write them).
    reference_stats: str | None = None
    # Which checkpoints `eval` compares: "untrained" (a fresh model of stage 1's size), "stage1",
    # "stage2" (each stage's newest checkpoint), or checkpoint paths.
    checkpoints: list[str] = ["untrained", "stage1", "stage2"]
    # Sampling (as in the `sample` section).
    resolution: Resolution | None = None  # None: each checkpoint's training resolution
    vq: str = "vq_ds16_t2i.pt"  # decodes the codes (a relative path is under models_root)
    text_encoder: str = "google/flan-t5-xl"  # path, hub id or tiny:NAME
    # Caption cleaning before the text encoder: "llamagen" (LlamaGen's preprocessing, what its
    # checkpoints' features were computed from) or "none" (the caption as it is).
    caption_clean: Literal["none", "llamagen"] = "none"
    model: str = "GPT-XL"  # for checkpoints without their config (LlamaGen's)
    text_rope: Literal["identity", "llamagen"] = "llamagen"  # for checkpoints without their config
    batch_size: int = 8
    cfg_scale: float = 7.5  # classifier-free guidance scale
    temperature: float = 1.0
    top_k: int = 1000
    top_p: float = 1.0
    seed: int = 0
    # Metrics. Inception-v3 weights in torch-fidelity's format (weights-inception-2015-12-05-
    # 6726825d.pth) by path: FID (and IS, precision/recall when asked); None: no Inception metrics.
    inception: str | None = None
    # The sha256 of the Inception weights, or its first characters (torch-fidelity's file names
    # carry the first 8); a file that does not match is refused. None: not checked.
    inception_sha256: str | None = "6726825d0af5f729cebd5821db510b11b1cfad8faad88a03f1befd49fb9129b2"
    inception_score: bool = False  # also the Inception Score
    precision_recall: bool = False  # also improved precision and recall
    # The CLIP for CLIP score and the CLIP-feature Frechet distance (ViT-L/14 at scale).
    clip: ClipModelConfig = ClipModelConfig()
    # Distribution: one sampling worker per GPU (or CPU worker), prompts in shards.
    num_workers: int = 1
    use_gpu: bool = False  # one GPU per sampling worker
    shard_size: int = 256  # prompts per shard
    retries: int = 1  # attempts per shard beyond the first
    html_prompts: int = 64  # prompts shown on the samples page
    # The tokenizer's evaluation: rFID, PSNR, SSIM, codebook usage.
    tokenizer: TokenizerEvalConfig = TokenizerEvalConfig()

    @model_validator(mode="after")
    def _positive(self):
        for key in ("images_per_prompt", "batch_size", "num_workers", "shard_size", "synthetic_prompts"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key} must be at least 1")
        if not self.checkpoints:
            raise ValueError("checkpoints must name at least one checkpoint")
        return self

    @property
    def device(self) -> str:
        return "cuda" if self.use_gpu else "cpu"
