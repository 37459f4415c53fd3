"""The demo's prompt-following reader is not fooled: it wants exactly one shape, matched to a
template, and reports the chance floor of each attribute."""
import numpy as np
import pytest
from PIL import Image, ImageDraw

from tessera.demo.synthetic import COLORS
from tessera.demo.world import PLACES, SHAPES, Picture, draw
from tessera.eval.prompt_following import (
    calibrated_templates,
    chance_floors,
    judge,
    palette_labels,
    read_picture,
    shape_region,
    templates_from_bytes,
    templates_to_bytes,
)
from tessera.eval.tokenizer_eval import reconstruct
from tessera.models.vq import build_tiny, load_vq

TRUTH = {"color": "red", "shape": "circle", "place": "on the left", "background": "blue"}


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("size", [128, 256])
def test_a_single_drawn_shape_reads_right(shape, size):
    img = np.asarray(draw(Picture(shape, "red", "blue", "on the left", size, size, size=0.18)))
    assert judge(read_picture(img, COLORS), {**TRUTH, "shape": shape})["all"]


def test_shapeless_speckles_at_the_named_place_fail():
    rng = np.random.default_rng(0)
    img = np.zeros((128, 128, 3), np.uint8) + np.array(COLORS["blue"], np.uint8)
    ys, xs = rng.integers(30, 98, 400), rng.integers(8, 56, 400)  # around "on the left"
    img[ys, xs] = COLORS["red"]
    seen = read_picture(img, COLORS)
    assert seen["shape"] == "none" and not judge(seen, TRUTH)["all"] and not judge(seen, TRUTH)["place"]


def test_two_shapes_fail_a_prompt_that_names_one():
    img = Image.new("RGB", (128, 128), COLORS["blue"])
    d = ImageDraw.Draw(img)
    d.ellipse([10, 40, 40, 70], fill=COLORS["red"])
    d.ellipse([14, 84, 44, 114], fill=COLORS["red"])
    seen = read_picture(np.asarray(img), COLORS)
    assert seen["shape"] == "several" and not judge(seen, TRUTH)["all"]


def test_noise_reads_as_no_shape():
    rng = np.random.default_rng(1)
    for _ in range(5):
        noise = rng.integers(0, 256, (128, 128, 3), dtype=np.uint8)
        assert read_picture(noise, COLORS)["shape"] == "none"


def test_chance_floors_are_the_commonest_answers_shares():
    truth = [{"color": "red", "shape": "circle", "place": "on the left", "background": "blue"},
             {"color": "red", "shape": "square", "place": "on the left", "background": "green"},
             {"color": "green", "shape": "square", "place": "at the top", "background": "blue"},
             {"color": "red", "shape": "cross", "place": "in the center", "background": "blue"}]
    assert chance_floors(truth) == {"color": 0.75, "background": 0.75, "place": 0.5, "shape": 0.5, "all": 0.25}


# Calibrated through the demo's VQ -------------------------------------------------------------------
@pytest.fixture(scope="module")
def demo_vq(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("vq") / "vq")
    build_tiny(path)
    return load_vq(path).eval()


def _through(vq, pictures: list) -> np.ndarray:
    return reconstruct(vq, np.stack([np.asarray(p) for p in pictures]), 16)[0]


@pytest.mark.parametrize("res", [128, 256])  # the demo evaluates stage 1 at 128px, stage 2 at 256px
def test_each_shape_passed_through_the_vq_reads_right_with_calibrated_templates(demo_vq, res):
    templates = calibrated_templates(demo_vq, res, COLORS)
    names = sorted(COLORS)
    truths = [{"shape": shape, "color": names[i % 8], "background": names[(i + 3) % 8], "place": place}
              for i, (shape, place) in enumerate((s, p) for s in SHAPES for p in PLACES)]
    pictures = [draw(Picture(t["shape"], t["color"], t["background"], t["place"], res, res)) for t in truths]
    recon = _through(demo_vq, pictures)
    wrong = []
    for t, img in zip(truths, recon):
        seen, raster = shape_region(img, COLORS)
        if judge(read_picture(img, COLORS, templates), t)["all"]:
            continue
        # At 128px the VQ's 16px patches leave a circle 4 patches wide: the mosaic is exactly
        # another shape's (a cross's or a square's), which no reader can tell apart.
        other = [v for v, s in zip(templates.overlaps(raster), templates.shapes) if s != t["shape"]] if raster is not None else []
        if res == 128 and t["shape"] == "circle" and max(other) == 1.0:
            continue
        # ... and it paints patches the shape covers in part in a third palette colour: where
        # that colour outweighs the shape's own, the picture no longer shows the shape's colour.
        labels, names = palette_labels(img, COLORS)
        counts = dict(zip(names, np.bincount(labels.ravel(), minlength=len(names))))
        third = max(v for k, v in counts.items() if k not in (t["color"], t["background"]))
        if not (res == 128 and third > counts[t["color"]]):
            wrong.append((t, seen))
    assert not wrong, wrong
    # Speckles at the named place and two shapes still fail, drawn or passed through the VQ.
    rng = np.random.default_rng(0)
    speckles = np.zeros((res, res, 3), np.uint8) + np.array(COLORS["blue"], np.uint8)
    ys, xs = rng.integers(res // 4, 3 * res // 4, res * 3), rng.integers(res // 16, 7 * res // 16, res * 3)
    speckles[ys, xs] = COLORS["red"]
    two = Image.new("RGB", (res, res), COLORS["blue"])
    d = ImageDraw.Draw(two)
    for cy in (res // 4, 3 * res // 4):
        d.ellipse([res // 8, cy - res // 8, 3 * res // 8, cy + res // 8], fill=COLORS["red"])
    two = np.asarray(two)
    for img, why in ((speckles, "none"), (two, "several")):
        for shown in (img, _through(demo_vq, [img])[0]):
            s = read_picture(shown, COLORS, templates)
            assert not judge(s, TRUTH)["all"] and not judge(s, TRUTH)["shape"]
        assert read_picture(img, COLORS, templates)["shape"] == why


def test_calibrated_templates_survive_their_cache_file(demo_vq):
    t = calibrated_templates(demo_vq, 128, COLORS, per_shape=4)
    back = templates_from_bytes(templates_to_bytes(t))
    assert back.shapes == t.shapes and back.min_overlap == t.min_overlap and np.array_equal(back.rasters, t.rasters)
