"""Evaluation protocols: clean-fid's resize exactly, LlamaGen's crop and filter, CLIP score as each
protocol computes it, precomputed reference statistics, the fields every row records, the
published COCO caption file, and pinned Inception weights."""
import io

import numpy as np
import pytest
from PIL import Image, ImageDraw

from tessera.core.store import ShardStore
from tessera.eval.coco30k import convert
from tessera.eval.fid import (
    Moments,
    check_sha256,
    clean_resize,
    clean_resize_uint8,
    frechet_distance,
    sha256_of,
)
from tessera.eval.protocols import (
    Gaussian,
    centre_crop_lanczos,
    protocol,
    read_reference_stats,
    row_fields,
)


def photo_like(h: int, w: int, seed: int) -> np.ndarray:
    """A smooth scene with hard-edged objects, sensor noise and JPEG compression."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w] / max(h, w)
    base = np.stack([sum(rng.uniform(20, 60) * np.sin(rng.uniform(1, 9) * x + rng.uniform(0, 6))
                         * np.cos(rng.uniform(1, 9) * y) for _ in range(4)) + rng.uniform(80, 170)
                     for _ in range(3)], -1)
    img = Image.fromarray(np.clip(base + rng.normal(0, 4, base.shape), 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(6):
        x0, y0 = rng.integers(0, w - 8), rng.integers(0, h - 8)
        box = [x0, y0, x0 + rng.integers(4, w // 3), y0 + rng.integers(4, h // 3)]
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=colour)
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=85)
    return np.asarray(Image.open(buf).convert("RGB"))


@pytest.mark.parametrize("shape", [(256, 256), (512, 512), (375, 500), (128, 128)])
def test_our_resize_is_clean_fids_resize(shape):
    from cleanfid.resize import make_resizer

    theirs = make_resizer("PIL", False, "bicubic", (299, 299))
    images = np.stack([photo_like(*shape, seed) for seed in range(3)])
    ours = clean_resize(images)
    for img, mine in zip(images, ours):
        np.testing.assert_array_equal(mine, theirs(img))
    # What torch-fidelity receives: the same values rounded, within half a level.
    assert np.abs(clean_resize_uint8(images).astype(np.float64) - ours).max() <= 0.5


def test_resizing_the_rgb_image_as_uint8_is_not_clean_fids_resize():
    """The shortcut this replaces: PIL rounds and clips between passes, far from clean-fid on edges."""
    images = np.stack([photo_like(256, 256, seed) for seed in range(3)])
    shortcut = np.stack([np.asarray(Image.fromarray(p).resize((299, 299), Image.BICUBIC)) for p in images])
    assert np.abs(shortcut.astype(np.float64) - clean_resize(images)).max() > 1.0


def test_llamagen_crop_is_torchvisions_centre_crop_then_lanczos():
    from torchvision.transforms import functional as TF

    for h, w in ((375, 500), (512, 300), (257, 256)):
        img = photo_like(h, w, 7)
        expected = TF.center_crop(Image.fromarray(img), min(h, w)).resize((256, 256), Image.LANCZOS)
        np.testing.assert_array_equal(centre_crop_lanczos(img, 256), np.asarray(expected))
    proto = protocol("llamagen_t2i")
    assert proto.prepare(np.stack([photo_like(512, 512, 1)])).shape == (1, 256, 256, 3)
    native = protocol("native")
    same = np.stack([photo_like(128, 128, 1)])
    assert native.prepare(same) is same


def test_clip_score_as_each_protocol_computes_it():
    cos = np.array([0.31, -0.02])
    np.testing.assert_allclose(protocol("llamagen_t2i").clip_scores(cos), cos)
    np.testing.assert_allclose(protocol("native").clip_scores(cos), [31.0, 0.0])
    assert protocol("llamagen_t2i").captions(["a dog"]) == ["A photo depicts a dog"]
    assert protocol("native").captions(["a dog"]) == ["a dog"]
    with pytest.raises(ValueError, match="unknown evaluation protocol 'gigagan'"):
        protocol("gigagan")


def test_precomputed_reference_statistics_give_the_same_fid_as_the_images(tmp_path):
    rng = np.random.default_rng(0)
    ref, gen = rng.normal(size=(300, 8)), rng.normal(0.3, 1.2, size=(200, 8))
    np.savez(tmp_path / "ref.npz", mu=ref.mean(0), sigma=np.cov(ref, rowvar=False))  # clean-fid's layout
    stats = read_reference_stats(str(tmp_path / "ref.npz"))
    assert isinstance(stats, Gaussian) and stats.count is None
    assert frechet_distance(Moments.of(gen), stats) == pytest.approx(
        frechet_distance(Moments.of(gen), Moments.of(ref)), rel=1e-9)
    np.savez(tmp_path / "bad.npz", mu=ref.mean(0))
    with pytest.raises(ValueError, match="no sigma"):
        read_reference_stats(str(tmp_path / "bad.npz"))


def test_every_row_records_the_protocol_and_warns_on_small_n():
    fields = row_fields(protocol("llamagen_t2i"), 512, 100, 40504, "inception", "ab" * 32, "ViT-B-32")
    assert fields["protocol"] == "llamagen_t2i" and fields["eval_resolution"] == 256
    assert (fields["n_gen"], fields["n_ref"], fields["feature_weights_sha256"]) == (100, 40504, "ab" * 32)
    assert "N_gen 100 < 30000" in fields["warning"] and "N_ref" not in fields["warning"]
    fields = row_fields(protocol("llamagen_t2i"), 256, 30000, None, "inception", None, "ViT-L-14")
    assert fields["warning"].endswith("comparable with published ones") and "not ViT-B-32" in fields["warning"]
    assert "warning" not in row_fields(protocol("native"), 128, 5000, 5000, "inception", None, "ViT-L-14")


def test_the_published_caption_file_becomes_a_prompt_set_in_order(tmp_path):
    (tmp_path / "coco_captions.csv").write_text(
        "Prompt\nA man riding a wave on top of a surfboard.\nTwo dogs, one \"big\" and one small\n")
    assert convert(str(tmp_path / "coco_captions.csv"), str(tmp_path / "p" / "coco30k.parquet")) == 2
    table = ShardStore(str(tmp_path / "p")).read_table("coco30k.parquet")
    assert table["prompt"].to_pylist() == ["A man riding a wave on top of a surfboard.",
                                           "Two dogs, one \"big\" and one small"]
    (tmp_path / "other.csv").write_text("text\nx\n")
    with pytest.raises(ValueError, match="no Prompt column"):
        convert(str(tmp_path / "other.csv"), str(tmp_path / "o.parquet"))


def test_inception_weights_are_pinned_by_sha256(tmp_path):
    path = tmp_path / "weights.pth"
    path.write_bytes(b"not the weights")
    digest = sha256_of(str(path))
    assert check_sha256(str(path), digest[:8]) == digest
    with pytest.raises(ValueError, match="does not match the pinned 6726825d"):
        check_sha256(str(path), "6726825d")


def test_evaluation_tensorboard_on_an_fsspec_root():
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from tessera.eval.results import write_tensorboard

    ev = ShardStore("memory://eval-tb/eval")
    write_tensorboard(ev, {"label": "stage1-step-00000002", "stage": "stage1", "step": 2, "fid": 12.5, "n_gen": 4})

    events = EventAccumulator(ev.url("tensorboard", "stage1"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("eval/fid")] == [(2, 12.5)]
