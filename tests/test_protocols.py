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


# Inception features: clean-fid's own feature path ---------------------------------------------------
INCEPTION_LAYERS = ("Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "MaxPool_1", "Conv2d_3b_1x1", "Conv2d_4a_3x3",
                    "MaxPool_2", "Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c", "Mixed_6d",
                    "Mixed_6e", "Mixed_7a", "Mixed_7b", "Mixed_7c", "AvgPool")


def _cleanfid_torchscript(weights: str, folder) -> None:
    """The network of `weights` in clean-fid's format: a TorchScript file whose `layers` map the
    normalised 299x299 image to the 2048 pool features (the layout of NVIDIA's inception-2015-12-05.pt)."""
    import torch
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path=weights).eval()

    class Scripted(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = torch.nn.Sequential(*(getattr(net, n) for n in INCEPTION_LAYERS))

        def forward(self, x):
            return self.layers(x)

    traced = torch.jit.trace(Scripted().eval(), torch.zeros(1, 3, 299, 299))
    traced.save(str(folder / "inception-2015-12-05.pt"))


def test_our_inception_features_are_clean_fids_on_photo_like_images(tmp_path):
    """clean-fid's own path (file -> its resizer -> float tensor -> (x - 128) / 128 -> layers) against
    ours, on one network. The Inception weights are not available offline: the network is
    torch-fidelity's Inception-v3 with random weights (batch norm calibrated so that every layer
    works at unit scale), saved both in torch-fidelity's format and as a TorchScript in clean-fid's."""
    import torch
    from cleanfid.fid import get_files_features
    from cleanfid.inception_torchscript import InceptionV3W

    from tessera.eval.fid import InceptionFeatures, save_random_inception

    weights = str(tmp_path / "inception.pth")
    save_random_inception(weights)
    _cleanfid_torchscript(weights, tmp_path)
    theirs_model = InceptionV3W(str(tmp_path), download=False, resize_inside=False).eval()
    images = [photo_like(h, w, seed) for seed, (h, w) in enumerate(((256, 256), (375, 500), (512, 512), (128, 128)))]
    files = []
    for i, img in enumerate(images):
        files.append(str(tmp_path / f"{i}.png"))
        Image.fromarray(img).save(files[-1])
    theirs = get_files_features(files, model=theirs_model, num_workers=0, batch_size=2, device=torch.device("cpu"),
                                mode="clean", verbose=False).astype(np.float64)
    ours = np.concatenate([InceptionFeatures(weights)(img[None])["2048"] for img in images])
    # The first convolution gets bit-identical inputs on both paths; the layers then differ only
    # in float32 summation order (batch of 2 against 1, traced against eager): about eps (6e-8)
    # times the square root of the terms summed per output (~1e3 for a 3x3x2048 convolution) per
    # layer, over ~20 layers: ~1e-5 of the features' scale. The bound is 1e-4 of it.
    scale = np.abs(theirs).max()
    assert scale > 0
    assert np.abs(ours - theirs).max() <= 1e-4 * scale
    # Rounding the resized image to uint8 (what torch-fidelity's extractor takes) moves the
    # features by more than that bound: the comparison tells the two inputs apart.
    extractor = InceptionFeatures(weights).model
    rounded = np.concatenate([extractor(torch.from_numpy(np.rint(clean_resize(img[None])).astype(np.uint8))
                                        .permute(0, 3, 1, 2))[0].numpy() for img in images])
    assert np.abs(rounded - theirs).max() > 1e-4 * scale


def test_a_weights_folder_has_a_digest_of_its_files(tmp_path):
    from tessera.eval.fid import weights_sha256

    (tmp_path / "m" / "sub").mkdir(parents=True)
    (tmp_path / "m" / "a.bin").write_bytes(b"one")
    (tmp_path / "m" / "sub" / "b.json").write_bytes(b"two")
    first = weights_sha256(str(tmp_path / "m"))
    assert len(first) == 64 and first == weights_sha256(str(tmp_path / "m"))
    assert weights_sha256(str(tmp_path / "m" / "a.bin")) == sha256_of(str(tmp_path / "m" / "a.bin"))
    (tmp_path / "m" / "sub" / "b.json").write_bytes(b"three")
    assert weights_sha256(str(tmp_path / "m")) != first  # any file's change changes it
