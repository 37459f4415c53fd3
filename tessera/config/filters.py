"""The `filters` section: how samples are scored (score stage) and kept or dropped (select stage).

Each score filter says where its score comes from (`source`), and how a score becomes keep or drop:
an absolute threshold (`min` for higher-is-better scores, `max` for lower-is-better ones) or
`keep_fraction`, a threshold chosen from the score's distribution. `target` then keeps an exact
number (or fraction) of the survivors, ranked by one score.
"""
from __future__ import annotations

from typing import Literal

from pydantic import model_validator

from tessera.config.base import Section

Source = Literal["compute", "metadata", "off"]


class ClipModelConfig(Section):
    # Any open_clip architecture name; the checkpoint is a path (file or folder with
    # open_clip_config.json + weights) or "tiny:clip". Relative weight paths in this section
    # are under the run's models_root. ViT-L-14 with OpenAI's weights feeds the
    # LAION aesthetic and NSFW heads, which were trained on its embeddings.
    model: str = "ViT-L-14"
    checkpoint: str = "clip-vit-l-14/open_clip_pytorch_model.bin"
    # OpenAI's CLIP weights were trained with QuickGELU.
    force_quick_gelu: bool = True


class ScoreFilterConfig(Section):
    """A score filter: where its score comes from, and at most one of min, max, keep_fraction."""

    # compute: run the model; metadata: read `column` from the input; off: no such score.
    source: Source = "compute"
    column: str = ""  # the input column read when source is metadata
    # When `source: metadata` and the input lacks `column`: compute instead, or drop the
    # samples with the reason `<score>_missing`. Never guessed.
    on_missing_column: Literal["compute", "drop"] = "compute"
    weights: str = ""  # the scoring head's weights (a relative path is under models_root)
    # Threshold of a higher-is-better score (clip_score, aesthetic): lower ones are dropped.
    min: float | None = None
    # Threshold of a lower-is-better score (watermark, nsfw): higher ones are dropped.
    max: float | None = None
    # Keep this share: the threshold is chosen from the score's distribution.
    keep_fraction: float | None = None

    @model_validator(mode="after")
    def _one_threshold(self):
        # A threshold given in the config replaces the class's default one.
        keys = ("min", "max", "keep_fraction")
        if any(k in self.model_fields_set for k in keys):
            for k in keys:
                if k not in self.model_fields_set:
                    self.__dict__[k] = None
        given = [k for k in ("min", "max", "keep_fraction") if getattr(self, k) is not None]
        if len(given) > 1:
            raise ValueError(f"give one of min, max, keep_fraction (got {', '.join(given)})")
        if self.keep_fraction is not None and not 0 < self.keep_fraction <= 1:
            raise ValueError("keep_fraction must be in (0, 1]")
        return self


class ClipScoreConfig(ScoreFilterConfig):
    column: str = "similarity"
    min: float | None = 0.28


class AestheticConfig(ScoreFilterConfig):
    column: str = "aesthetic"
    weights: str = "sac+logos+ava1-l14-linearMSE.pth"
    min: float | None = 5.0


class WatermarkConfig(ScoreFilterConfig):
    column: str = "pwatermark"
    weights: str = "watermark_model_v1.pt"
    # timm architecture of the detector's backbone.
    arch: str = "efficientnet_b3a"
    image_size: int = 256  # the detector's input side
    max: float | None = 0.5


class NsfwConfig(ScoreFilterConfig):
    column: str = "punsafe"
    weights: str = "clip_autokeras_binary_nsfw.pth"
    max: float | None = 0.5


class SizeConfig(Section):
    enabled: bool = True
    # Of the original image, before download resizing.
    min_side: int = 256
    max_aspect_ratio: float = 3.0  # largest long side / short side kept


class CaptionRulesConfig(Section):
    enabled: bool = True
    min_words: int = 2  # fewer words: dropped
    max_chars: int = 1000  # longer captions: dropped
    # Letters over non-space characters: URLs, hashes and file names score low.
    min_letter_fraction: float = 0.5


class DedupConfig(Section):
    # Exact copies: samples with the same image bytes (the download's sha256) keep the lowest key;
    # the others are dropped as exact_duplicate before the semantic search. Hash-partitioned.
    exact: bool = True
    # Semantic dedup (near-duplicates) on or off.
    enabled: bool = True
    # Two images are near-duplicates when the cosine of their CLIP embeddings reaches this.
    min_similarity: float = 0.95
    # Semantic dedup (SemDeDup): spherical k-means over a sample of the survivors' embeddings,
    # then an exact search within each cluster. Unset: one cluster per `rows_per_cluster`
    # survivors (as SemDeDup does). Fewer clusters find more pairs that lie near a cluster
    # boundary; one cluster is the exact all-pairs search.
    n_clusters: int | None = None
    rows_per_cluster: int = 50_000  # survivors per cluster when n_clusters is unset
    # A cluster larger than this is split by a second k-means level before the search (its
    # members near a sub-cluster boundary are searched in both), so no search grows without bound.
    max_cluster_size: int = 100_000
    # The search compares embeddings in tiles of block x block.
    block: int = 1024
    # At most this many embeddings train the k-means (sampled evenly from the shards).
    sample_size: int = 100_000
    niter: int = 20  # k-means iterations
    # An embedding whose second-nearest centroid is within this cosine of its nearest is also
    # searched in that second cluster, so pairs split by a boundary are still found.
    spill_margin: float = 0.05
    # Search tasks (hash partitions of the content hashes, and of the clusters).
    partitions: int = 16
    # Shards read by one exchange task; each such task writes one file per pass.
    shards_per_task: int = 64

    @model_validator(mode="after")
    def _positive(self):
        for name in ("rows_per_cluster", "max_cluster_size", "block", "partitions", "shards_per_task"):
            if getattr(self, name) < 1:
                raise ValueError(f"dedup.{name} must be at least 1")
        if self.n_clusters is not None and self.n_clusters < 1:
            raise ValueError("dedup.n_clusters must be at least 1 (or unset: from the row count)")
        return self

    def clusters_for(self, survivors: int) -> int:
        if self.n_clusters is not None:
            return self.n_clusters
        return max(1, round(survivors / self.rows_per_cluster))


class TargetConfig(Section):
    # Keep exactly `count` (or `fraction` of the downloaded samples) of those that pass every
    # filter, ranked by `rank_by`; ties are broken by key.
    count: int | None = None
    fraction: float | None = None  # a share of the downloaded samples instead of a count
    # The score the survivors are ranked by, best first.
    rank_by: Literal["clip_score", "aesthetic", "pwatermark", "punsafe"] = "clip_score"

    @model_validator(mode="after")
    def _one_target(self):
        if self.count is not None and self.fraction is not None:
            raise ValueError("give target.count or target.fraction, not both")
        if self.fraction is not None and not 0 < self.fraction <= 1:
            raise ValueError("target.fraction must be in (0, 1]")
        return self


class FiltersConfig(Section):
    # Samples per model batch, model actors, what each actor holds, and attempts per shard
    # beyond the first before the shard is recorded as failed.
    batch_size: int = 64
    concurrency: int = 1  # score model actors
    # GPUs each score actor holds.
    num_gpus_per_actor: float = 0.0
    # CPUs each score actor holds.
    num_cpus_per_actor: float = 1.0
    shard_retries: int = 2  # attempts per shard beyond the first
    # bf16 autocast for the models on GPU.
    precision: Literal["fp32", "bf16"] = "bf16"
    # The CLIP whose image embedding feeds the CLIP-based scores and dedup.
    clip: ClipModelConfig = ClipModelConfig()
    # Size rules on the original image.
    size: SizeConfig = SizeConfig()
    # Caption rules.
    caption: CaptionRulesConfig = CaptionRulesConfig()
    # CLIP image-text similarity (cosine).
    clip_score: ClipScoreConfig = ClipScoreConfig()
    # The LAION aesthetic predictor on the CLIP embedding.
    aesthetic: AestheticConfig = AestheticConfig()
    # The LAION watermark detector (its own timm backbone).
    watermark: WatermarkConfig = WatermarkConfig()
    # LAION's CLIP-based NSFW detector.
    nsfw: NsfwConfig = NsfwConfig()
    # Exact copies by content hash, then near-duplicates by the cosine of CLIP image embeddings.
    dedup: DedupConfig = DedupConfig()
    # Keep an exact number of the samples that pass every filter.
    target: TargetConfig = TargetConfig()
    # Examples per side of each threshold in report.html.
    report_examples: int = 6
    # Quantile sketches (KLL) that locate keep_fraction thresholds and the target boundary: the
    # normalized rank error is 1.33% at k=200 (99% confidence). The boundary is then settled
    # exactly from the rows near it, gathered once their count is at most `max_gather`.
    sketch_k: int = 200
    max_gather: int = 200_000  # most rows gathered to settle a boundary exactly
