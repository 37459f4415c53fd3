"""Scorer models: tiny ones in the real formats load through the real loaders; the real
aesthetic predictor file loads strictly."""
import json
import os

import numpy as np
import pytest
import torch

from tessera.models import aesthetic, clip, nsfw, refs, watermark
from tessera.models.weights import weights_file

from .conftest import reference_file


@pytest.fixture(scope="module")
def models_root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("models"))


def test_real_aesthetic_weights_load_strictly():
    head = aesthetic.load_aesthetic(str(reference_file("sac+logos+ava1-l14-linearMSE.pth")))
    assert head.embed_dim == 768
    emb = torch.nn.functional.normalize(torch.randn(4, 768, generator=torch.Generator().manual_seed(0)), dim=-1)
    scores = head(emb).detach()
    assert scores.shape == (4,) and torch.isfinite(scores).all()
    # A predictor of the real layout, with one key renamed, is refused rather than half-loaded.
    state = torch.load(reference_file("sac+logos+ava1-l14-linearMSE.pth"), map_location="cpu", weights_only=True)
    assert sorted({k.split(".")[1] for k in state}) == ["0", "2", "4", "6", "7"]


def test_aesthetic_refuses_a_wrong_layout(tmp_path):
    state = aesthetic.AestheticHead(16).state_dict()
    state["layers.8.weight"] = state.pop("layers.7.weight")
    torch.save(state, tmp_path / "bad.pth")
    with pytest.raises(RuntimeError, match="layers.7.weight"):
        aesthetic.load_aesthetic(str(tmp_path / "bad.pth"))
    torch.save({"fc.weight": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="not an aesthetic predictor"):
        aesthetic.load_aesthetic(str(tmp_path / "other.pth"))


def test_tiny_clip_is_an_open_clip_checkpoint_loaded_by_name(models_root):
    path = refs.resolve("tiny:clip", models_root)
    with open(os.path.join(path, clip.CONFIG_FILE)) as f:
        assert json.load(f)["model_cfg"]["embed_dim"] == clip.TINY_CONFIG["embed_dim"]
    from PIL import Image

    model = clip.Clip(clip.TINY_ARCH, path)
    pixels = np.stack([model.preprocess(Image.new("RGB", (90, 60), c)) for c in ((255, 0, 0), (0, 0, 255))])
    assert pixels.shape == (2, 64, 64, 3) and pixels.dtype == np.uint8
    images, texts = model.encode_images(pixels), model.encode_texts(["a red square", "a blue circle"])
    assert images.shape == texts.shape == (2, 32)
    np.testing.assert_allclose(np.linalg.norm(images, axis=1), 1, rtol=1e-5)
    # The same weights given as the file itself (the way ViT-L-14 checkpoints are named) load too.
    again = clip.Clip(clip.TINY_ARCH, os.path.join(path, "open_clip_pytorch_model.bin"))
    np.testing.assert_allclose(again.encode_images(pixels), images, atol=1e-5)


def test_the_tokenizer_cache_of_a_long_lived_scorer_is_bounded(models_root):
    model = clip.Clip(clip.TINY_ARCH, refs.resolve("tiny:clip", models_root))
    before = model.encode_texts(["a red square"])
    model.tokenizer_cache_words = 200
    for batch in range(10):  # 1000 made-up words, 100 a call
        model.encode_texts([" ".join(f"w{batch}x{i}q" for i in range(100))])
        assert len(model.tokenizer.cache) <= 200
    assert "<start_of_text>" in model.tokenizer.cache
    np.testing.assert_allclose(model.encode_texts(["a red square"]), before, atol=1e-6)  # same tokens after


def test_clip_errors_name_the_problem(tmp_path, models_root):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        clip.Clip("ViT-B-32", str(tmp_path / "nope.bin"))
    with pytest.raises(ValueError, match="does not know the architecture"):
        clip.Clip("no-such-arch", os.path.join(refs.resolve("tiny:clip", models_root), "open_clip_pytorch_model.bin"))


def test_nsfw_head_loads_its_layout(models_root):
    head = nsfw.load_nsfw(weights_file(refs.resolve("tiny:nsfw", models_root)))
    assert set(head.state_dict()) >= {"norm.mean", "norm.variance", "linear_1.weight", "linear_4.bias"}
    p = head(torch.nn.functional.normalize(torch.randn(3, head.embed_dim), dim=-1)).detach()
    assert ((p > 0) & (p < 1)).all()


@pytest.mark.parametrize("layout", ["nested", "raw"])
def test_watermark_loads_both_layouts(tmp_path, models_root, layout):
    path = weights_file(refs.resolve("tiny:watermark", models_root))
    if layout == "raw":  # the other script's layout: the state dict itself
        state = torch.load(path, map_location="cpu", weights_only=True)["weights"]
        path = str(tmp_path / "raw.pt")
        torch.save(state, path)
    model = watermark.load_watermark(path, watermark.TINY_ARCH)
    assert isinstance(model.classifier[0], torch.nn.Linear) and model.classifier[-1].out_features == 2
    from PIL import Image

    x = torch.from_numpy(np.stack([watermark.preprocess(Image.new("RGB", (300, 100), (9, 9, 9)))]))
    assert x.shape == (1, 256, 256, 3)
    p = watermark.pwatermark(model, x)
    assert p.shape == (1,) and 0 < float(p[0]) < 1


def test_real_watermark_architecture_matches_the_published_head():
    model = watermark.build_detector("efficientnet_b3a")
    head = model.classifier
    assert (head[0].in_features, head[0].out_features, head[3].out_features, head[5].out_features) == (1536, 625, 256, 2)


@pytest.mark.parametrize("shape", [(300, 451, 3), (451, 300, 3), (224, 224, 3), (100, 80, 3)])
def test_clip_preprocess_matches_open_clips_eval_transform(shape):
    import open_clip
    from PIL import Image

    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, shape, dtype=np.uint8))
    pre = clip.ClipPreprocess(224)
    ours = pre.normalize(torch.from_numpy(np.array(pre(img))[None]))[0]
    theirs = open_clip.image_transform(224, is_train=False)(img)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)
