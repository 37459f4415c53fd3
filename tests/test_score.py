"""The score stage on Ray Data with tiny models in their real formats: one image pass feeds every
CLIP-based score, unreadable images and missing columns end with a reason, reruns skip done shards."""
import io
import json

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
import webdataset as wds
from PIL import Image

from tessera.config.ray import RayConfig
from tessera.config.filters import FiltersConfig
from tessera.pipelines import filter_report, score, select, select_reference
from tessera.core.store import ShardStore

from .fixtures import write_download_shard

TINY = {
    "batch_size": 4, "precision": "fp32",
    "clip": {"model": "tessera-tiny-clip", "checkpoint": "tiny:clip", "force_quick_gelu": False},
    "clip_score": {"keep_fraction": 0.8},
    # The input has no `aesthetic` column: computed instead, and the report says so.
    "aesthetic": {"source": "metadata", "weights": "tiny:aesthetic", "keep_fraction": 0.9},
    "watermark": {"weights": "tiny:watermark", "arch": "test_efficientnet", "keep_fraction": 0.9},
    "nsfw": {"source": "metadata", "max": 0.5},
    "dedup": {"min_similarity": 0.999},
    "target": {"count": 6},
}


def write_troubled_shard(store: ShardStore, shard: str) -> None:
    """A download shard with a good image, a corrupt one, one without its image file, and a
    sample whose punsafe is missing."""
    good = io.BytesIO()
    Image.new("RGB", (320, 300), (200, 30, 30)).save(good, "JPEG")
    samples = [("good", good.getvalue(), 0.01), ("corrupt", b"\xff\xd8\xff\xe0 not really a jpeg", 0.01),
               ("noimage", None, 0.01), ("nopunsafe", good.getvalue(), None)]
    buf, rows = io.BytesIO(), []
    with wds.TarWriter(buf) as tar:
        for i, (name, jpg, punsafe) in enumerate(samples):
            key = f"{shard}{i:04d}"
            meta = {"key": key, "url": f"http://127.0.0.1:1/{name}.jpg", "caption": f"a {name} picture of a red square",
                    "status": "success", "original_width": 320, "original_height": 300, "sha256": "0" * 64,
                    "hash": i, "punsafe": punsafe, "similarity": 0.3}
            sample = {"__key__": key, "txt": meta["caption"], "json": json.dumps(meta)}
            if jpg is not None:
                sample["jpg"] = jpg
            tar.write(sample)
            rows.append(meta)
    store.write_bytes(buf.getvalue(), "download", f"{shard}.tar")
    store.write_table(pa.Table.from_pylist(rows), "download", f"{shard}.parquet")
    store.mark_done("download", shard, {"rows_in": 4, "downloaded": 4, "dropped": {}})


@pytest.fixture(scope="module")
def scored(ray_local, tmp_path_factory):
    root = tmp_path_factory.mktemp("score")
    store = ShardStore(str(root / "data"))
    write_download_shard(store, "00000", n=6)
    write_download_shard(store, "00001", n=5)
    write_troubled_shard(store, "00002")
    cfg = FiltersConfig.model_validate(TINY)
    result = score.run(cfg, RayConfig(num_cpus=2), store, str(root / "models"))
    return store, cfg, result, str(root / "models")


def test_every_sample_is_scored_once_per_shard(scored):
    store, _, result, _ = scored
    assert result.samples == 15 and result.shards == 3
    assert result.funnel() == [{"stage": "score", "outcome": "scored", "reason": "", "count": 15}]
    for shard, n in (("00000", 6), ("00001", 5), ("00002", 4)):
        assert store.is_done("score", shard)
        frame = store.read_table("scores", f"{shard}.parquet").to_pandas()
        assert len(frame) == n and frame["key"].is_monotonic_increasing
        for col in ("key", "url", "hash", "sha256", "original_width", "original_height",
                    "clip_score", "aesthetic", "pwatermark", "punsafe", "short_side", "caption_words"):
            assert col in frame, col
        emb = np.load(io.BytesIO(store.fs.open(store.path("embeddings", f"{shard}.npy"), "rb").read()))
        assert emb.shape == (n, 32) and emb.dtype == np.float16


def test_unreadable_images_and_missing_values_are_recorded_not_fatal(scored):
    store, *_ = scored
    frame = store.read_table("scores", "00002.parquet").to_pandas().set_index("url")
    assert frame.loc["http://127.0.0.1:1/good.jpg", "error"] == ""
    assert frame.loc["http://127.0.0.1:1/corrupt.jpg", "error"] == "corrupt_image"
    assert frame.loc["http://127.0.0.1:1/noimage.jpg", "error"] == "missing_image"
    for bad in ("corrupt", "noimage"):
        assert np.isnan(frame.loc[f"http://127.0.0.1:1/{bad}.jpg", ["clip_score", "aesthetic", "pwatermark"]]
                        .astype(float)).all()
    assert np.isfinite(frame.loc["http://127.0.0.1:1/good.jpg", ["clip_score", "aesthetic", "pwatermark"]]
                       .astype(float)).all()
    assert np.isnan(frame.loc["http://127.0.0.1:1/nopunsafe.jpg", "punsafe"])
    assert store.done_info("score", "00002")["unreadable"] == {"corrupt_image": 1, "missing_image": 1}


def test_sources_say_what_was_computed_and_what_was_read(scored):
    _, _, result, _ = scored
    assert result.sources["nsfw"] == {"source": "metadata", "column": "punsafe"}
    assert result.sources["aesthetic"] == {"source": "compute", "column": None, "fallback_from": "aesthetic"}
    assert result.sources["clip_score"]["source"] == "compute"


def test_rerun_skips_done_shards(scored):
    store, cfg, _, models = scored
    before = {s: store.fs.modified(store.path("score", f"{s}.done")) for s in ("00000", "00001", "00002")}
    again = score.run(cfg, RayConfig(num_cpus=2), store, models)
    assert again.samples == 15
    assert {s: store.fs.modified(store.path("score", f"{s}.done")) for s in before} == before


def test_select_and_report_account_for_every_sample(scored):
    store, cfg, result, _ = scored
    chosen = select.run(cfg, store)
    frame = select_reference.load_scores(store, ["00000", "00001", "00002"], decisions=True).set_index("url")
    assert chosen.kept == 6 == int(frame["keep"].sum())
    assert (frame["keep"] == (frame["reason"] == "")).all()
    assert chosen.kept + sum(chosen.dropped.values()) == 15
    assert frame.loc["http://127.0.0.1:1/corrupt.jpg", "reason"] == "corrupt_image"
    assert frame.loc["http://127.0.0.1:1/noimage.jpg", "reason"] == "missing_image"
    assert frame.loc["http://127.0.0.1:1/nopunsafe.jpg", "reason"] in ("punsafe_missing", "low_clip_score",
                                                                      "low_aesthetic", "watermark")
    url = filter_report.build(store, result.funnel() + chosen.funnel())
    page = open(url).read()
    assert "aesthetic" in page and "computed by the model" in page and "input column &#x27;punsafe&#x27;" in page


def test_one_clip_image_pass_feeds_every_clip_filter(scored, monkeypatch):
    _, cfg, _, models = scored
    sources = {"clip_score": {"source": "compute", "column": None}, "aesthetic": {"source": "compute", "column": None},
               "nsfw": {"source": "compute", "column": None}}
    cfg = cfg.model_copy(update={"nsfw": cfg.nsfw.model_copy(update={"source": "compute", "weights": "tiny:nsfw"}),
                                 "watermark": cfg.watermark.model_copy(update={"source": "off"})})
    scorer = score.BatchScorer(cfg, sources, score.model_paths(cfg, sources, models))
    calls = []
    real = scorer.clip.encode_images
    monkeypatch.setattr(scorer.clip, "encode_images", lambda px: calls.append(len(px)) or real(px))
    img = Image.new("RGB", (300, 280), (10, 200, 30))
    pixels = np.stack([scorer.clip.preprocess(img)] * 3)
    meta = pd.DataFrame({"key": ["a", "b", "c"], "caption": ["a green square"] * 3,
                         "original_width": [300] * 3, "original_height": [280] * 3})
    out = scorer.score(meta, pixels, None, np.array([True, False, True]))
    assert calls == [2]  # one image pass, readable images only
    for col in ("clip_score", "aesthetic", "punsafe"):
        assert np.isfinite(out[col][[0, 2]]).all() and np.isnan(out[col][1])
    assert out["embedding"].shape == (3, 32)


def test_input_columns_come_from_the_download_markers(tmp_path):
    store = ShardStore(str(tmp_path / "data"))
    markers = {"00000": {"columns": ["key", "url", "punsafe", "pwatermark"]},
               "00001": {"columns": ["key", "url", "punsafe"]}}  # no parquet on disk: never opened
    assert score.input_columns(store, ["00000", "00001"], markers) == {"key", "url", "punsafe"}
    # A marker written before markers carried columns: that shard's parquet schema is read.
    store.write_table(pa.Table.from_pylist([{"key": "a", "url": "u", "similarity": 0.3}]), "download", "00002.parquet")
    markers["00002"] = {"rows_in": 1}
    assert score.input_columns(store, sorted(markers), markers) == {"key", "url"}


def test_an_unreadable_shard_is_a_clear_error(tmp_path):
    store = ShardStore(str(tmp_path))
    store.write_bytes(b"not a tar" * 100, "download", "00007.tar")
    with pytest.raises(RuntimeError, match=r"(?s)00007.tar cannot be read .*remove download/00007.done"):
        score.read_shard(store, "00007")


def test_no_downloads_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="no finished download shards"):
        score.run(FiltersConfig(), RayConfig(), ShardStore(str(tmp_path)), str(tmp_path / "models"))


def test_missing_weights_are_named_before_any_work(tmp_path):
    cfg = FiltersConfig.model_validate({"clip": {"checkpoint": "tiny:clip", "model": "tessera-tiny-clip"},
                                        "aesthetic": {"weights": "nowhere/aesthetic.pth"}})
    sources = {"aesthetic": {"source": "compute", "column": None}}
    with pytest.raises(FileNotFoundError, match="filters.aesthetic.weights: model 'nowhere/aesthetic.pth' is not in "
                                                "models_root .*tessera fetch-models"):
        score.model_paths(cfg, sources, str(tmp_path))
