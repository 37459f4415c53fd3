"""The truth metrics count correctly on a constructed case."""
import numpy as np
import pandas as pd
import pytest

from tessera.demo import truth


def _truth(rows):
    return pd.DataFrame(rows, columns=["url", "kind", "detail", "shape", "color", "background", "place",
                                       "duplicate_of"]).set_index("url")


THRESHOLDS = {"filters": {
    "clip_score": {"score": "clip_score", "threshold": 0.2, "keep_if": ">="},
    "aesthetic": {"score": "aesthetic", "threshold": 4.0, "keep_if": ">="},
    "watermark": {"score": "pwatermark", "threshold": 0.5, "keep_if": "<="},
    "nsfw": {"score": "punsafe", "threshold": 0.1, "keep_if": "<="},
    "near_duplicate": {"min_similarity": 0.99},
}}


def test_filter_metrics_count_caught_defects_and_flagged_clean_samples():
    t = _truth([
        ("u0", "clean", "", "circle", "red", "blue", "on the left", None),
        ("u1", "clean", "", "square", "red", "blue", "on the left", None),
        ("u2", "clean", "", "cross", "red", "blue", "on the left", None),
        ("u3", "clean", "", "cross", "red", "blue", "on the left", None),
        ("u4", "mismatched_caption", "", "circle", "red", "blue", "on the left", None),
        ("u5", "mismatched_caption", "", "circle", "red", "blue", "on the left", None),
        ("u6", "watermark", "text", "circle", "red", "blue", "on the left", None),
        ("u7", "low_aesthetic", "blur", "circle", "red", "blue", "on the left", None),
        ("u8", "nsfw", "", "circle", "red", "blue", "on the left", None),
        ("u9", "near_duplicate", "resized", "circle", "red", "blue", "on the left", "u0"),
        ("u10", "near_duplicate", "cropped", "square", "red", "blue", "on the left", "u1"),
        ("u11", "crawl_fault", "http_404", None, None, None, None, None),
        ("u12", "near_duplicate", "reencoded", "cross", "red", "blue", "on the left", "u3"),
    ])
    keys = [f"k{i:02d}" for i in range(11)] + ["k12"]
    scores = pd.DataFrame({
        "key": keys,
        "url": [f"u{i}" for i in range(11)] + ["u12"],
        #              clean: 1 low clip score        mismatched: 1 of 2 caught
        "clip_score": [0.3, 0.1, 0.3, 0.3, 0.1, 0.3, 0.3, 0.05, 0.3, 0.3, 0.3, 0.3],
        "aesthetic": [6, 6, 3, 6, 6, 6, 6, 2, 6, 6, 6, 6],
        "pwatermark": [0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.9, 0.1, 0.1, 0.1, 0.1, 0.1],
        "punsafe": [0.0] * 8 + [0.5, 0.0, 0.0, 0.0],
        # u3 (clean) and its copy u12 are both dropped as duplicates of u0: one group, the copy caught.
        "reason": ["", "low_clip_score", "low_aesthetic", "near_duplicate", "low_clip_score", "", "watermark",
                   "low_clip_score", "nsfw", "near_duplicate", "", "near_duplicate"],
        "duplicate_of": [""] * 3 + ["k00"] + [""] * 5 + ["k00", "", "k00"],
        "keep": [True, False, False, False, False, True, False, False, False, False, True, False],
    })
    m = truth.filter_metrics(scores, t, THRESHOLDS)
    by = {r["filter"]: r for r in m["per_filter"]}
    assert (by["clip_score"]["planted"], by["clip_score"]["caught"]) == (2, 1)
    assert by["clip_score"]["clean_flagged"] == 1 and by["clip_score"]["clean"] == 4
    # The blurred picture fails clip_score first, but the aesthetic score still flags it.
    assert (by["aesthetic"]["planted"], by["aesthetic"]["caught"], by["aesthetic"]["clean_flagged"]) == (1, 1, 1)
    assert (by["watermark"]["caught"], by["watermark"]["clean_flagged"]) == (1, 0)
    assert by["nsfw"]["caught"] == 1
    # u9 is dropped as a duplicate of its original, u12 in its original's group; u10 was not found.
    assert (by["near_duplicate"]["planted"], by["near_duplicate"]["caught"]) == (3, 2)
    assert by["near_duplicate"]["clean_flagged"] == 1  # u3, a duplicate of another clean picture
    assert m["clean_flagged_by_quality_filters"] == 2 and m["clean_flagged_by_quality_filters_rate"] == 0.5
    outcome = {r["kind"]: r for r in m["outcome"]}
    assert outcome["clean"] == {"kind": "clean", "samples": 4, "kept": 1}
    assert "crawl_fault" not in outcome  # never scored
    rows = truth.filter_rows(m)
    assert rows[0]["caught %"] == "50.0" and rows[-1]["clean flagged %"] == "50.0"


def test_caption_metrics_parse_the_grammar_and_count_fallbacks_as_misses():
    t = _truth([
        ("u0", "clean", "", "circle", "red", "blue", "on the left", None),
        ("u1", "clean", "", "square", "green", "white", "at the top", None),
        ("u2", "clean", "", "cross", "black", "yellow", "in the center", None),
        ("u3", "clean", "", "triangle", "orange", "purple", "at the bottom", None),
    ])
    captions = pd.DataFrame({
        "key": ["a", "b", "c", "d"], "url": ["u0", "u1", "u2", "u3"],
        "caption_long": ["a red circle on the left on a blue background.",
                         "a green square on the right on a white background.",
                         "a black cross in the center on a yellow background.",  # a fallback: not counted
                         "a blue triangle at the bottom on a purple background."],
        "fallback_reason": ["", "", "repetition", ""],
    })
    m = truth.caption_metrics(captions, t)
    assert (m["samples"], m["generated"], m["fallback"]) == (4, 3, 1)
    assert m["color_and_shape"] == 2 and m["color_and_shape_rate"] == 0.5
    assert m["generated_color_and_shape_rate"] == pytest.approx(2 / 3, abs=1e-4)
    assert m["place_rate"] == 0.5 and m["background_rate"] == 0.75 and m["fallback_rate"] == 0.25


def test_parse_caption():
    assert truth.parse_caption("A purple triangle at the top on a white background. It is a triangle.") == {
        "color": "purple", "shape": "triangle", "background": "white", "place": "at the top"}
    assert truth.parse_caption("something else") == {"color": None, "shape": None, "background": None, "place": None}


def test_reconstruction_metrics_are_zero_for_a_perfect_tokenizer():
    from PIL import Image

    class Identity:
        def encode(self, x):
            return x

        def decode(self, z):
            return z

    class Darker(Identity):
        def decode(self, z):
            return z - 10 / 127.5

    img = Image.fromarray(np.random.default_rng(0).integers(20, 235, (40, 48, 3), dtype=np.uint8))
    perfect = truth.reconstruction_metrics(Identity(), [img], 32)
    assert perfect["mae"] == pytest.approx(0, abs=1e-3) and perfect["psnr"] > 60
    off = truth.reconstruction_metrics(Darker(), [img], 32)
    assert off["mae"] == pytest.approx(10, abs=1e-2)
    assert off["psnr"] == pytest.approx(10 * np.log10(255 ** 2 / 100), abs=1e-2)


def test_a_printed_rate_is_rounded_once():
    hit, of = np.arange(105) < 104, np.ones(105, bool)  # 99.0476%: rounding twice prints 99.1
    assert truth._pct(truth._rate(hit, of)) == "99.0"
