"""The metric code of the eval stage: Fréchet distance, merged moments, Inception features by path,
prompt-following on the synthetic world, and the tokenizer metrics."""
import numpy as np
import pytest
import torch

from tessera.eval.fid import InceptionFeatures, Moments, frechet_distance, merge, save_random_inception

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def inception_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("inception") / "weights-inception-random.pth"
    save_random_inception(str(path), seed=0)
    return str(path)


def _images(n: int, seed: int, size: int = 64) -> np.ndarray:
    """Noise around a colour of its own per image, so that sets differ in their features."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (n, 1, 1, 3))
    return np.clip(base + rng.integers(-40, 40, (n, size, size, 3)), 0, 255).astype(np.uint8)


def _moments_of(mu: np.ndarray, cov: np.ndarray, n: int) -> Moments:
    """Moments whose mean and unbiased covariance are exactly mu and cov."""
    return Moments(n * mu, (n - 1) * cov + n * np.outer(mu, mu), n)


# The Inception tests read the extractor's 64-d features (its first block): the same weights file,
# loading, resizing and Fréchet code as the 2048-d pool features, a fraction of the CPU time. With 4
# images the covariances are rank-deficient, as with fewer images than 2048 dims.
def test_identical_image_sets_give_fid_zero(inception_path):
    features = InceptionFeatures(inception_path, feature="64")
    f = features(_images(4, 0))["64"]
    assert f.shape == (4, 64) and np.isfinite(f).all() and f.std() > 0
    assert abs(frechet_distance(Moments.of(f), Moments.of(f.copy()))) < 1e-3


def test_gaussians_with_known_moments_give_the_closed_form():
    rng = np.random.default_rng(0)
    d = 6
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    s1, s2 = rng.uniform(0.1, 3, d), rng.uniform(0.1, 3, d)
    q, _ = np.linalg.qr(rng.normal(size=(d, d)))  # the same rotation of both: the distance is unchanged
    a = _moments_of(mu1 @ q.T, q @ np.diag(s1) @ q.T, 1000)
    b = _moments_of(mu2 @ q.T, q @ np.diag(s2) @ q.T, 500)
    closed = ((mu1 - mu2) ** 2).sum() + (s1 + s2 - 2 * np.sqrt(s1 * s2)).sum()
    assert frechet_distance(a, b) == pytest.approx(closed, rel=1e-9)
    # And from samples: close to the population figure.
    x = rng.normal(size=(200_000, d)) * np.sqrt(s1) + mu1
    y = rng.normal(size=(200_000, d)) * np.sqrt(s2) + mu2
    assert frechet_distance(Moments.of(x), Moments.of(y)) == pytest.approx(closed, rel=0.02)


def test_our_figure_equals_the_libraries_on_the_same_features():
    from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric

    from torchmetrics.image.fid import FrechetInceptionDistance

    class Identity(torch.nn.Module):
        num_features = 16

        def forward(self, x):
            return x

    rng = np.random.default_rng(1)
    real, fake = rng.normal(size=(300, 16)), rng.normal(0.3, 1.2, size=(200, 16))
    metric = FrechetInceptionDistance(feature=Identity())
    metric.update(torch.from_numpy(real), real=True)
    metric.update(torch.from_numpy(fake), real=False)
    ours = frechet_distance(Moments.of(real[:100]) + Moments.of(real[100:]), Moments.of(fake))
    assert ours == pytest.approx(float(metric.compute()), rel=1e-6)
    stats = [fid_features_to_statistics(torch.from_numpy(f)) for f in (real, fake)]
    theirs = fid_statistics_to_metric(*stats, verbose=False)["frechet_inception_distance"]
    assert ours == pytest.approx(theirs, rel=1e-9)


def test_our_fid_equals_torchmetrics_on_the_same_images(inception_path):
    from torchmetrics.image.fid import FrechetInceptionDistance

    # At 299x299 clean-fid's resize changes nothing, so torchmetrics' uint8 input is our float input.
    real, fake = _images(8, 2, 299), _images(8, 3, 299) // 2
    ours = InceptionFeatures(inception_path, feature="64")
    value = frechet_distance(Moments.of(ours(real)["64"]), Moments.of(ours(fake)["64"]))
    metric = FrechetInceptionDistance(feature=64, feature_extractor_weights_path=inception_path)
    for imgs, is_real in ((real, True), (fake, False)):
        metric.update(torch.from_numpy(imgs).permute(0, 3, 1, 2).contiguous(), real=is_real)
    assert value > 1 and value == pytest.approx(float(metric.compute()), rel=1e-4)


def test_merged_moments_equal_the_single_pass():
    rng = np.random.default_rng(2)
    f = rng.normal(size=(97, 5)) * 3 + 1
    parts = [Moments.of(f[:10]), Moments.of(f[10:60]), Moments.of(f[60:])]
    merged = merge([Moments.from_bytes(p.to_bytes()) for p in parts])  # as workers write them
    whole = Moments.of(f)
    assert merged.count == 97
    assert np.allclose(merged.total, whole.total) and np.allclose(merged.outer, whole.outer)
    assert np.allclose(merged.mean, f.mean(0)) and np.allclose(merged.cov, np.cov(f, rowvar=False))
    with pytest.raises(ValueError, match="merge moments of 5 and 4"):
        merged + Moments.zeros(4)


def test_inception_weights_that_are_not_a_state_dict_are_refused(tmp_path):
    bad = tmp_path / "bad.pth"
    torch.save({"something": torch.zeros(1)}, bad)
    with pytest.raises(ValueError, match="not torch-fidelity's Inception"):
        InceptionFeatures(str(bad))
    with pytest.raises(FileNotFoundError):
        InceptionFeatures(str(tmp_path / "missing.pth"))


# Prompt-following -----------------------------------------------------------------------------------
def _heldout(tmp_path, n=40, size=256):
    from tessera.core.store import ShardStore
    from tessera.demo.prompts import write_heldout_prompts
    from tessera.eval.prompts import read_prompt_set

    store = ShardStore(str(tmp_path / "heldout"))
    write_heldout_prompts(store, n, seed=0, image_size=size)
    return store, read_prompt_set(store).to_pylist()


def _load(store, url):
    from PIL import Image

    with store.fs.open(url.replace(store.root, store._base, 1), "rb") as f:
        return np.asarray(Image.open(f).convert("RGB"))


def _accuracy(images, rows):
    from tessera.eval.prompt_following import judge, read_picture
    from tessera.demo.synthetic import COLORS

    hits = [judge(read_picture(img, COLORS), row) for img, row in zip(images, rows)]
    return {k: np.mean([h[k] for h in hits]) for k in hits[0]}


def test_heldout_prompts_are_unseen_in_training_and_carry_their_truth(tmp_path):
    from tessera.demo.synthetic import picture

    store, rows = _heldout(tmp_path)
    seen = {picture(i, 0).caption for i in range(300)}
    assert len(rows) == 40 and len({r["prompt"] for r in rows}) == 40
    assert not seen & {r["prompt"] for r in rows}
    r = rows[0]
    assert r["prompt"] == f"a {r['color']} {r['shape']} {r['place']} on a {r['background']} background"


def test_prompt_following_reads_rendered_truth_perfectly_and_scrambled_images_poorly(tmp_path):
    store, rows = _heldout(tmp_path)
    images = [_load(store, r["image"]) for r in rows]
    assert _accuracy(images, rows) == {"color": 1.0, "background": 1.0, "place": 1.0, "shape": 1.0, "all": 1.0}
    # The VQ-sized mosaic of a truth image (16x16 patches) still reads right for colours and place.
    small = [np.asarray(__import__("PIL.Image", fromlist=["Image"]).fromarray(i).resize((16, 16)).resize((256, 256), 0))
             for i in images]
    mosaic = _accuracy(small, rows)
    assert mosaic["color"] == mosaic["background"] == mosaic["place"] == 1.0
    # Each image judged against another prompt's truth: low.
    rolled = _accuracy(images[1:] + images[:1], rows)
    assert rolled["all"] < 0.2 and rolled["color"] < 0.4
    # Pixels shuffled: colours survive, where and what the shape is do not.
    rng = np.random.default_rng(0)
    shuffled = [rng.permutation(i.reshape(-1, 3)).reshape(i.shape) for i in images]
    acc = _accuracy(shuffled, rows)
    assert acc["all"] < 0.2 and acc["shape"] < 0.5


# Tokenizer metrics ----------------------------------------------------------------------------------
def test_tokenizer_metrics_on_the_tiny_vq(tmp_path):
    from tessera.eval.tokenizer_eval import code_counts, codebook_usage, psnr_ssim, reconstruct
    from tessera.models.vq import build_tiny, load_vq

    build_tiny(str(tmp_path / "vq"))
    vq = load_vq(str(tmp_path / "vq"))
    store, rows = _heldout(tmp_path, n=4)
    images = np.stack([_load(store, r["image"]) for r in rows])
    recon, codes = reconstruct(vq, images)
    assert recon.shape == images.shape and recon.dtype == np.uint8 and codes.shape == (4, 16, 16)
    psnr, ssim = psnr_ssim(images, recon)
    assert psnr.shape == (4,) and (psnr > 10).all() and (ssim > 0.3).all() and (ssim <= 1).all()
    noise = np.random.default_rng(0).integers(0, 256, images.shape, dtype=np.uint8)
    assert (psnr_ssim(images, noise)[0] < psnr).all()
    counts = code_counts(codes, 512)
    assert counts.sum() == codes.size and 0 < codebook_usage(counts) < 0.1


def test_a_prompt_set_without_prompts_or_a_config_without_one_is_refused(tmp_path):
    import pyarrow as pa

    from tessera.config import load_config
    from tessera.eval.prompts import read_prompt_set
    from tessera.pipelines.evaluate import prompt_store
    from tessera.core.store import ShardStore

    store = ShardStore(str(tmp_path))
    store.write_table(pa.table({"caption": ["a red circle"]}), "p.parquet")
    with pytest.raises(ValueError, match="no `prompt` column"):
        read_prompt_set(store, "p.parquet")
    store.write_table(pa.table({"prompt": [1, 2]}), "q.parquet")
    with pytest.raises(ValueError, match="must be strings"):
        read_prompt_set(store, "q.parquet")
    cfg = load_config("configs/demo.yaml", [f"data_root={tmp_path}", "source.synthetic=null"])
    with pytest.raises(ValueError, match="eval.prompts is not set"):
        prompt_store(cfg)


def test_inception_score_and_precision_recall_through_torch_fidelity():
    from tessera.eval.fid import inception_score, precision_recall

    assert inception_score(np.zeros((20, 1008)))[0] == pytest.approx(1.0)  # one flat distribution: IS 1
    confident = np.full((20, 1008), -20.0)
    confident[np.arange(20), np.arange(20)] = 20.0  # 20 images, 20 sure and different classes
    assert inception_score(confident, splits=1)[0] == pytest.approx(20.0, rel=1e-3)
    rng = np.random.default_rng(0)
    real = rng.normal(size=(200, 8))
    assert precision_recall(real, real) == (1.0, 1.0)
    far = precision_recall(real + 100.0, real)
    assert far == (0.0, 0.0)


def test_fetch_models_knows_the_eval_sections_models():
    from tessera.config import load_config
    from tessera.models import fetch
    from tessera.fetch_models import named_models

    cfg = load_config("configs/demo.yaml", ["eval.inception=weights-inception-2015-12-05-6726825d.pth",
                                            "eval.clip.checkpoint=clip-vit-l-14/open_clip_pytorch_model.bin"])
    named = dict(named_models(cfg))
    assert named["eval.inception"] == "weights-inception-2015-12-05-6726825d.pth"
    assert named["eval.clip.checkpoint"] == "clip-vit-l-14/open_clip_pytorch_model.bin"
    assert "eval.vq" not in named  # tiny models are built, not fetched
    assert fetch.source_for(named["eval.inception"]).url.endswith("/v0.2.0/weights-inception-2015-12-05-6726825d.pth")
