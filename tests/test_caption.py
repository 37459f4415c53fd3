"""The caption stage on Ray Data with the tiny LLaVA: one row per kept sample, fallbacks, resume."""
from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest
import webdataset as wds

from tessera.config import load_config
from tessera.config.caption import CaptionConfig
from tessera.config.ray import RayConfig
from tessera.pipelines import caption, tokenize
from tessera.core.store import ShardStore
from tests.fixtures import write_download_shard, write_selection

KEEP = {"00000": [True, True, False, True, True, True], "00001": [True, False, True, True, True, False]}
CORRUPT = "000010002"  # a kept sample of shard 00001 whose image bytes are not an image


def corrupt_image(store: ShardStore, shard: str, key: str) -> None:
    path = store.path("download", f"{shard}.tar")
    with tarfile.open(path) as tar:
        members = [(m.name, tar.extractfile(m).read()) for m in tar.getmembers() if m.isfile()]
    buf = io.BytesIO()
    with wds.TarWriter(buf) as out:
        samples: dict[str, dict] = {}
        for name, data in members:
            k, _, ext = name.partition(".")
            samples.setdefault(k, {"__key__": k})[ext] = b"not a jpeg" if (k, ext) == (key, "jpg") else data
        for sample in samples.values():
            out.write(sample)
    store.write_bytes(buf.getvalue(), "download", f"{shard}.tar")


def config() -> CaptionConfig:
    return CaptionConfig(model="tiny:llava", max_new_tokens=8, batch_size=4, num_actors=1, precision="fp32")


@pytest.fixture(scope="module")
def captioned(ray_local, tmp_path_factory):
    root = tmp_path_factory.mktemp("caption")
    store = ShardStore(str(root / "data"))
    originals = {}
    for shard, keep in KEEP.items():
        rows = write_download_shard(store, shard, n=len(keep))
        write_selection(store, shard, rows, keep)
        originals.update({r["key"]: r["caption"] for r, k in zip(rows, keep) if k})
    corrupt_image(store, "00001", CORRUPT)
    models = str(root / "models")
    result = caption.run(config(), RayConfig(num_cpus=2), store, models)
    return store, models, result, originals


def test_every_kept_sample_gets_one_caption_row(captioned):
    store, _, result, originals = captioned
    for shard, keep in KEEP.items():
        table = store.read_table("captions", f"{shard}.parquet")
        assert table.column_names == ["key", "caption_long", "caption_short", "captioner", "prompt", "generation",
                                      "fallback_reason"]
        rows = table.to_pylist()
        assert [r["key"] for r in rows] == sorted(k for k in originals if k.startswith(shard))
        assert store.is_done("caption", shard) and store.done_info("caption", shard)["rows_in"] == sum(keep)
        for r in rows:
            assert r["captioner"] == "tiny:llava" and r["prompt"] == CaptionConfig().prompt
            assert json.loads(r["generation"]) == {"backend": "transformers", "max_new_tokens": 8,
                                                   "do_sample": False, "dtype": "float32", "batch_size": 4}
            if r["fallback_reason"]:
                assert r["caption_long"] == originals[r["key"]]
            else:
                assert r["caption_long"] and r["caption_long"] == r["caption_long"].strip()
            assert r["caption_long"].startswith(r["caption_short"])
    corrupt = next(r for r in store.read_table("captions", "00001.parquet").to_pylist() if r["key"] == CORRUPT)
    assert corrupt["fallback_reason"] == "corrupt_image"


def test_counts_add_up_in_the_funnel(captioned):
    _, _, result, originals = captioned
    assert result.rows_in == len(originals) == sum(map(sum, KEEP.values()))
    assert result.captioned + sum(result.fallback.values()) == result.rows_in
    funnel = result.funnel()
    assert sum(r["count"] for r in funnel) == result.rows_in
    assert all(r["stage"] == "caption" and r["outcome"] in ("captioned", "fallback") for r in funnel)
    assert {"stage": "caption", "outcome": "fallback", "reason": "corrupt_image", "count": 1} in funnel


def test_tokenize_reads_the_captions(captioned):
    store, _, _, _ = captioned
    written = {r["key"]: r for r in store.read_table("captions", "00000.parquet").to_pylist()}
    rows = tokenize.read_shard(store, "00000", "caption_long")
    assert rows and all(r["captioned"] for r in rows)
    for r in rows:
        meta = json.loads(r["meta"])
        assert (meta["caption_long"], meta["caption_short"]) == (written[r["key"]]["caption_long"],
                                                                 written[r["key"]]["caption_short"])


def test_a_killed_run_resumes_without_redoing_finished_shards(captioned):
    store, models, _, _ = captioned
    before = {s: store.read_table("captions", f"{s}.parquet").to_pylist() for s in KEEP}
    finished = Path(store.path("captions", "00000.parquet")).stat().st_mtime_ns
    # As if the run died while writing 00001: a half-written temporary, no output, no marker.
    Path(store.path("captions", "00001.parquet")).unlink()
    Path(store.path(*store.marker("caption", "00001"))).unlink()
    Path(store.path("captions", "00001.parquet.tmp-dead0000")).write_bytes(b"half")
    result = caption.run(config(), RayConfig(num_cpus=2), store, models)
    assert Path(store.path("captions", "00000.parquet")).stat().st_mtime_ns == finished
    assert {s: store.read_table("captions", f"{s}.parquet").to_pylist() for s in KEEP} == before
    assert result.rows_in == sum(map(sum, KEEP.values())) and result.shards == 2
    assert store.list("captions") == ["00000.parquet", "00001.parquet"]
    assert not list(Path(store.path("captions")).glob("*.tmp-*"))


def test_no_selected_shards_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="no selected shards to caption"):
        caption.run(config(), RayConfig(), ShardStore(str(tmp_path)), str(tmp_path / "models"))


def test_demo_config_captions_with_the_tiny_llava():
    cfg = load_config("configs/demo.yaml").caption
    assert cfg.model == "tiny:world-llava" and cfg.enabled and cfg.backend == "transformers"
    with pytest.raises(ValueError, match="prompt_template"):
        CaptionConfig(prompt_template="no slots")
