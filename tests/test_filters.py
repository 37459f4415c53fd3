"""Each filter on crafted inputs: what it scores, and keep or drop with the reason."""
import numpy as np
import pandas as pd
import pytest
import torch

from tessera.config.filters import FiltersConfig
from tessera.filters import ORDER, Batch, Needs, build_filters, resolve_sources
from tessera.filters.aesthetic import AestheticFilter
from tessera.filters.caption import CaptionFilter
from tessera.filters.clip_score import ClipScoreFilter
from tessera.filters.dedup import NearDuplicateFilter
from tessera.filters.image import ImageFilter
from tessera.filters.nsfw import NsfwFilter
from tessera.filters.size import SizeFilter
from tessera.filters.watermark import WatermarkFilter


def scored(f, batch):
    return pd.DataFrame(f.score(batch))


def unit(rows):
    a = np.asarray(rows, dtype=np.float32)
    return a / np.linalg.norm(a, axis=1, keepdims=True)


def test_size_filter_drops_small_and_elongated_and_unknown_sizes():
    meta = pd.DataFrame({"original_width": [512, 200, 1200, None, 300],
                         "original_height": [400, 900, 300, 300, 0]})
    f = SizeFilter(min_side=256, max_aspect_ratio=3.0)
    scores = scored(f, Batch(meta=meta))
    assert scores["short_side"].tolist()[:3] == [400, 200, 300]
    assert list(f.decide(scores)) == ["", "too_small", "aspect_ratio", "size_missing", "size_missing"]
    assert f.needs == Needs.METADATA
    no_sizes = Batch(meta=pd.DataFrame({"key": ["a"]}))
    assert list(f.decide(scored(f, no_sizes))) == ["size_missing"]


def test_caption_rules():
    captions = ["a red circle on a blue background", "", "   ", "cat", "x" * 30 + " " + "y" * 30,
                "IMG_2034.JPG 0x1f3a9 #### 12345 ...", None]
    f = CaptionFilter(min_words=2, max_chars=40, min_letter_fraction=0.5)
    reasons = f.decide(scored(f, Batch(meta=pd.DataFrame({"caption": captions}))))
    assert list(reasons) == ["", "caption_empty", "caption_empty", "caption_too_short", "caption_too_long",
                             "caption_not_text", "caption_empty"]


def test_clip_score_is_the_cosine_and_drops_low_and_nan():
    img = unit([[1, 0], [1, 0], [0, 1]])
    txt = unit([[1, 0], [1, 1], [1, 0]])
    f = ClipScoreFilter(threshold=0.5)
    scores = scored(f, Batch(meta=pd.DataFrame({"key": list("abc")}), image_embedding=img, text_embedding=txt))
    np.testing.assert_allclose(scores["clip_score"], [1.0, np.sqrt(0.5), 0.0], atol=1e-6)
    scores.loc[1, "clip_score"] = np.nan
    assert list(f.decide(scores)) == ["", "clip_score_missing", "low_clip_score"]
    assert f.needs == Needs.IMAGE_EMBEDDING | Needs.TEXT_EMBEDDING


class Linear1(torch.nn.Module):
    """A head whose output is the first embedding coordinate (what the score filters call)."""

    def __init__(self, squash=False):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.squash = squash

    def forward(self, x):
        return torch.sigmoid(x[:, 0] * 10) if self.squash else x[:, 0] * 10


def test_aesthetic_uses_its_head_on_the_image_embedding():
    f = AestheticFilter(head=Linear1(), threshold=5.0)
    emb = unit([[0.9, 0.1], [0.2, 0.98]])
    scores = scored(f, Batch(meta=pd.DataFrame({"key": ["a", "b"]}), image_embedding=emb))
    assert scores["aesthetic"].iloc[0] > 5 > scores["aesthetic"].iloc[1]
    assert list(f.decide(scores)) == ["", "low_aesthetic"]


def test_nsfw_drops_above_its_maximum():
    f = NsfwFilter(head=Linear1(squash=True), threshold=0.5)
    emb = unit([[-0.9, 0.1], [0.9, 0.1]])
    scores = scored(f, Batch(meta=pd.DataFrame({"key": ["a", "b"]}), image_embedding=emb))
    assert list(f.decide(scores)) == ["", "nsfw"]
    assert scores.columns.tolist() == ["punsafe"]


class Brightness(torch.nn.Module):
    """A 'detector' whose watermark logit is the mean pixel value."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x):
        m = x.mean(dim=(1, 2, 3))
        return torch.stack([m * 10, torch.zeros_like(m)], dim=1)


def test_watermark_reads_pixels_and_takes_class_zero():
    f = WatermarkFilter(model=Brightness(), threshold=0.5)
    pixels = np.stack([np.full((8, 8, 3), 0, np.uint8), np.full((8, 8, 3), 255, np.uint8)])
    scores = scored(f, Batch(meta=pd.DataFrame({"key": ["dark", "bright"]}), watermark_pixels=pixels))
    assert scores["pwatermark"].iloc[0] < 0.5 < scores["pwatermark"].iloc[1]
    assert list(f.decide(scores)) == ["", "watermark"]
    assert f.needs == Needs.PIXELS


def test_metadata_fast_path_reads_the_column_and_drops_what_is_missing():
    f = WatermarkFilter(threshold=0.5, metadata_column="pwatermark")
    meta = pd.DataFrame({"pwatermark": [0.1, None, "0.9", "n/a"]})
    scores = scored(f, Batch(meta=meta))
    assert list(f.decide(scores)) == ["", "pwatermark_missing", "watermark", "pwatermark_missing"]
    assert f.needs == Needs.METADATA and f.source == "metadata:pwatermark"
    # A column the input lacks entirely: every sample missing, none guessed.
    assert list(f.decide(scored(f, Batch(meta=pd.DataFrame({"key": ["a", "b"]}))))) == ["pwatermark_missing"] * 2


def test_threshold_for_fraction_keeps_the_best_share():
    values = np.array([0.1, 0.5, 0.3, np.nan, 0.9, 0.7])
    assert ClipScoreFilter().threshold_for_fraction(values, 0.4) == 0.7   # top 2 of 5 valid
    assert NsfwFilter().threshold_for_fraction(values, 0.4) == 0.3        # lowest 2 of 5
    with pytest.raises(ValueError, match="no valid scores"):
        ClipScoreFilter().threshold_for_fraction(np.array([np.nan]), 0.5)


def test_near_duplicates_within_and_across_groups_keep_the_lowest_key():
    emb = unit([[1, 0, 0], [0, 1, 0], [1, 0.01, 0], [0, 0, 1], [0.999, 0.02, 0], [0, 1, 0.001]])
    keys = ["k5", "k2", "k1", "k4", "k3", "k0"]
    dup = NearDuplicateFilter(min_similarity=0.99).duplicate_of(keys, emb)
    # {k5, k1, k3} -> k1 kept; {k2, k0} -> k0 kept; k4 alone.
    assert list(dup) == ["k1", "k0", "", "", "k1", ""]
    f = NearDuplicateFilter(0.99)
    assert list(f.decide(pd.DataFrame({"duplicate_of": dup}))) == ["near_duplicate", "near_duplicate", "", "", "near_duplicate", ""]
    # The same inputs in another order give the same groups: the choice depends on keys only.
    perm = [3, 0, 5, 1, 4, 2]
    again = NearDuplicateFilter(0.99, block=2).duplicate_of([keys[i] for i in perm], emb[perm])
    assert list(again) == [dup[i] for i in perm]


def test_image_filter_passes_on_decode_errors():
    f = ImageFilter()
    assert list(f.decide(pd.DataFrame({"error": ["", "corrupt_image", None, "missing_image"]}))) == \
        ["", "corrupt_image", "", "missing_image"]


def test_build_filters_follows_the_order_and_config():
    cfg = FiltersConfig.model_validate({"watermark": {"source": "off"}, "dedup": {"enabled": False},
                                        "nsfw": {"source": "metadata"}})
    filters = build_filters(cfg, resolve_sources(cfg, {"punsafe"}))
    names = [f.name for f in filters]
    assert names == [n for n in ORDER if n in names] == ["image", "caption", "size", "clip_score", "aesthetic", "nsfw",
                                                         "exact_duplicate"]
    nsfw = filters[-2]
    assert nsfw.metadata_column == "punsafe" and nsfw.threshold == 0.5


def test_missing_metadata_column_falls_back_or_drops_as_configured(caplog):
    cfg = FiltersConfig.model_validate({"clip_score": {"source": "metadata"},
                                        "aesthetic": {"source": "metadata", "on_missing_column": "drop"}})
    sources = resolve_sources(cfg, {"url"})
    assert sources["clip_score"] == {"source": "compute", "column": None, "fallback_from": "similarity"}
    assert sources["aesthetic"] == {"source": "missing", "column": "aesthetic"}
    assert "no 'similarity' column; computing" in caplog.text
    assert "dropped as aesthetic_missing" in caplog.text


def test_a_threshold_in_the_config_replaces_the_default():
    cfg = FiltersConfig.model_validate({"aesthetic": {"keep_fraction": 0.3}, "nsfw": {"max": 0.2}})
    assert cfg.aesthetic.min is None and cfg.aesthetic.keep_fraction == 0.3
    with pytest.raises(ValueError, match="give one of"):
        FiltersConfig.model_validate({"aesthetic": {"keep_fraction": 0.3, "min": 5}})
    with pytest.raises(ValueError, match="target.count or target.fraction"):
        FiltersConfig.model_validate({"target": {"count": 3, "fraction": 0.5}})
