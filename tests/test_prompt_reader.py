"""The demo's prompt-following reader is not fooled: it wants exactly one shape, matched to a
template, and reports the chance floor of each attribute."""
import numpy as np
import pytest
from PIL import Image, ImageDraw

from tessera.demo.synthetic import COLORS
from tessera.demo.world import SHAPES, Picture, draw
from tessera.eval.prompt_following import chance_floors, judge, read_picture

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
