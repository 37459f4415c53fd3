"""Every stage on the stage runtime: an unreadable download tar fails only its shard (score,
caption, tokenize), a rerun completes it; a re-selection redoes exactly the stale caption and
token shards; the training loader refuses code shards of different selections."""
from __future__ import annotations

import os

import pytest

from tessera.config.caption import CaptionConfig
from tessera.config.ray import RayConfig
from tessera.config.filters import FiltersConfig
from tessera.config.tokenize import TokenizeConfig
from tessera.config.train import CodesDataConfig
from tessera.pipelines import caption, score, tokenize
from tessera.core import runtime
from tessera.training.data import CodesLoader
from tessera.core.store import ShardStore
from tests.fixtures import write_download_shard, write_selection

SHARDS = ("00000", "00001", "00002")
BROKEN = "00001"
# Scores read from the metadata only: no model, so the test is about the stage, not the models.
METADATA_ONLY = {"batch_size": 4, "clip_score": {"source": "metadata", "min": 0.1},
                 "aesthetic": {"source": "off"}, "watermark": {"source": "metadata", "max": 0.5},
                 "nsfw": {"source": "metadata", "max": 0.5}, "dedup": {"enabled": False}}
CAPTION = CaptionConfig(model="tiny:llava", max_new_tokens=4, batch_size=4, num_actors=1, precision="fp32",
                        shard_retries=1)
TOKENIZE = TokenizeConfig(batch_size=4, shard_retries=1)


def break_tar(store: ShardStore, shard: str) -> bytes:
    good = store.fs.cat(store.path("download", f"{shard}.tar"))
    store.write_bytes(b"this is not a tar file " * 40, "download", f"{shard}.tar")
    return good


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("failures")
    store = ShardStore(str(root / "data"))
    rows = {s: write_download_shard(store, s, n=3, seed=i) for i, s in enumerate(SHARDS)}
    return store, str(root / "models"), rows


def assert_only_broken_failed(store: ShardStore, stage: str, result) -> None:
    assert result.failed.keys() == {BROKEN} and "cannot be read" in result.failed[BROKEN]
    assert runtime.failures(store, stage)[BROKEN]["attempts"] == 2
    assert [s for s in SHARDS if store.is_done(stage, s)] == ["00000", "00002"]
    failed_rows = [r for r in result.funnel() if r["outcome"] == "failed"]
    assert failed_rows and all(r["reason"] == "shard_failed" and r["count"] == 3 for r in failed_rows)


def test_score_isolates_an_unreadable_tar_and_a_rerun_completes_it(ray_local, world):
    store, models, _ = world
    cfg = FiltersConfig.model_validate({**METADATA_ONLY, "shard_retries": 1})
    good = break_tar(store, BROKEN)
    result = score.run(cfg, RayConfig(), store, models)
    assert_only_broken_failed(store, "score", result)
    assert result.samples == 6 and result.failed_rows == 3
    store.write_bytes(good, "download", f"{BROKEN}.tar")
    again = score.run(cfg, RayConfig(), store, models)
    assert not again.failed and again.samples == 9 and runtime.failures(store, "score") == {}


@pytest.fixture(scope="module")
def selected(world):
    store, models, rows = world
    for shard in SHARDS:
        write_selection(store, shard, rows[shard], [True, True, True])
    return store, models, rows


def test_caption_isolates_an_unreadable_tar_and_a_rerun_completes_it(ray_local, selected):
    store, models, _ = selected
    good = break_tar(store, BROKEN)
    try:
        result = caption.run(CAPTION, RayConfig(), store, models)
    finally:
        store.write_bytes(good, "download", f"{BROKEN}.tar")
    assert_only_broken_failed(store, "caption", result)
    again = caption.run(CAPTION, RayConfig(), store, models)
    assert list(again.failed) == [] and again.rows_in == 9 and again.shards == 3


def test_tokenize_isolates_an_unreadable_tar_and_a_rerun_completes_it(ray_local, selected):
    store, models, _ = selected
    good = break_tar(store, BROKEN)
    try:
        result = tokenize.run(TOKENIZE, RayConfig(), store, models)
    finally:
        store.write_bytes(good, "download", f"{BROKEN}.tar")
    assert_only_broken_failed(store, "tokenize", result)
    assert not store.exists("tokens/256", f"{BROKEN}.done")
    again = tokenize.run(TOKENIZE, RayConfig(), store, models)
    assert not again.failed and again.per_resolution[256]["rows_in"] == 9


def test_a_reselection_redoes_exactly_the_stale_shards(ray_local, selected):
    store, models, rows = selected
    caption.run(CAPTION, RayConfig(), store, models)
    tokenize.run(TOKENIZE, RayConfig(), store, models)
    outputs = [("captions", "{}.parquet"), ("tokens/256", "{}.tar")]
    before = {(folder, s): os.path.getmtime(store.path(folder, name.format(s))) for folder, name in outputs
              for s in SHARDS}
    old = store.read_json("reports", "thresholds.json")["fingerprint"]
    # A new selection that changes one shard's kept samples only.
    write_selection(store, "00002", rows["00002"], [True, False, True])
    store.write_json({"fingerprint": "second-selection", "shards": list(SHARDS)}, "reports", "thresholds.json")
    caption.run(CAPTION, RayConfig(), store, models)
    tokenize.run(TOKENIZE, RayConfig(), store, models)
    after = {(folder, s): os.path.getmtime(store.path(folder, name.format(s))) for folder, name in outputs
             for s in SHARDS}
    redone = sorted({s for (folder, s), t in after.items() if t != before[(folder, s)]})
    assert redone == ["00002"]
    assert store.done_info("caption", "00002")["rows_in"] == 2
    for folder in ("caption", "tokenize", "tokens/256"):
        assert {store.done_info(folder, s)["selection"] for s in SHARDS} == {"second-selection"} != {old}
    assert store.read_json("tokens/256", "manifest.json")["selection"] == "second-selection"


def test_the_loader_refuses_code_shards_of_different_selections(ray_local, selected):
    store, models, _ = selected
    tokenize.run(TOKENIZE, RayConfig(), store, models)
    info = store.done_info("tokens/256", "00001")
    store.mark_done("tokens/256", "00001", {**info, "selection": "an-older-selection"})
    loader = CodesLoader(store, CodesDataConfig(resolution=256), global_batch=2)
    with pytest.raises(ValueError, match=r"mixes shards of 2 different selections.*an-older-selection: 00001"):
        loader.next_batch()
