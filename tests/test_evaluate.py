"""The eval stage end to end on tiny models: checkpoints sampled on Ray, figures merged from the
workers' moments, metrics.jsonl, TensorBoard, the samples page, the tokenizer, resume, failures."""
import dataclasses
import json
import os

import numpy as np
import pytest
import torch

from tessera.config import load_config
from tessera.demo.flow import heldout_prompts
from tessera.eval.fid import Moments
from tessera.models.gpt import build_gpt
from tessera.pipelines import evaluate
from tessera.training.checkpoint import Checkpointer
from tessera.core.store import ShardStore

pytestmark = pytest.mark.usefixtures("one_thread")


def write_nano_checkpoint(run_dir: str) -> None:
    """A stage-1 checkpoint at step 2 of an untrained GPT-nano at 256px (the tiny VQ's codebook,
    the tiny T5's width)."""
    torch.manual_seed(0)
    model = build_gpt("GPT-nano", grid=16, vocab_size=512)
    optimizer = torch.optim.AdamW(model.parameters())
    Checkpointer(ShardStore(run_dir), keep=1).save(
        2, model, optimizer, {"config": {"stage": "stage1", "resolution": 256,
                                         "model_config": dataclasses.asdict(model.cfg)}})


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory, ray_local):
    tmp = tmp_path_factory.mktemp("eval")
    overrides = [
        f"data_root={tmp}/data", f"runs_root={tmp}/runs", f"models_root={tmp}/models",
        "eval.synthetic_prompts=4", "eval.images_per_prompt=1", "eval.shard_size=2", "eval.batch_size=2",
        "eval.tokenizer.max_images=2"]
    cfg = load_config("configs/demo.yaml", overrides + heldout_prompts(load_config("configs/demo.yaml", overrides)))
    write_nano_checkpoint(f"{tmp}/runs/demo/stage1")
    result = evaluate.run(cfg, checkpoints=["untrained", "stage1"])
    return cfg, result, ShardStore(f"{tmp}/runs/demo/eval")


@pytest.mark.slow  # one Ray actor per checkpoint, the reference and the tokenizer: minutes on 2 cores
def test_every_checkpoint_gets_its_figures(evaluated):
    _, result, ev = evaluated
    assert [r["label"] for r in result.rows] == ["untrained", "stage1-step-00000002"]
    for row in result.rows:
        assert row["images"] == 4 and row["prompts"] == 4 and row["failed_shards"] == 0
        assert 0 <= row["prompt_following"] <= row["prompt_following_color"] <= 1
        assert row["clip_score"] >= 0 and np.isfinite(row["clip_feature_frechet"]) and row["clip_feature_frechet"] >= 0
        assert "fid" not in row  # no Inception weights configured
    assert result.rows[0]["checkpoint"] == result.rows[1]["checkpoint"]  # the untrained copy of stage 1's size
    lines = [json.loads(x) for x in open(ev.path("metrics.jsonl"))]
    assert [x["label"] for x in lines] == ["untrained", "stage1-step-00000002"]
    assert os.listdir(ev.path("tensorboard")) and sorted(os.listdir(ev.path("tensorboard"))) == ["stage1", "untrained"]


@pytest.mark.slow
def test_the_samples_page_groups_the_images_by_prompt(evaluated):
    _, result, ev = evaluated
    page = open(ev.path("samples.html")).read()
    prompts = ShardStore(f"{ev.root.rsplit('/runs/', 1)[0]}/data/eval/heldout").read_table("prompts.parquet")
    for p in prompts["prompt"].to_pylist():
        assert p in page
    images = [s.split('"')[0] for s in page.split('<img src="')[1:]]
    assert len(images) == 8 and all(os.path.exists(ev.path(i)) for i in images)


@pytest.mark.slow
def test_merged_moments_equal_one_pass_over_the_same_images(evaluated):
    cfg, _, ev = evaluated
    store = ShardStore(ev.url("stage1-step-00000002"))
    assert len(store.list("moments", ".clip.npz")) == 2  # two shards, two workers' worth of moments
    rows = [r for n in store.list("rows", ".parquet") for r in store.read_table("rows", n).to_pylist()]
    pixels = np.stack([evaluate.read_image(store.url(r["image"])) for r in rows])
    features = evaluate.Features(cfg.eval, cfg.models_root, "cpu").measure(pixels, [r["prompt"] for r in rows])
    one_pass = Moments.of(features["clip"])
    merged = evaluate.merged(store, "moments", ".clip.npz", ["00000", "00001"])
    assert merged.count == one_pass.count == 4
    assert np.allclose(merged.total, one_pass.total, atol=1e-5) and np.allclose(merged.outer, one_pass.outer, atol=1e-5)
    assert np.allclose(features["clip_score"], [r["clip_score"] for r in rows], atol=1e-4)


@pytest.mark.slow
def test_the_tokenizer_is_evaluated_at_every_configured_resolution(evaluated):
    cfg, result, _ = evaluated
    assert [r["resolution"] for r in result.tokenizer] == cfg.eval.tokenizer.resolutions == [128, 256]
    for r in result.tokenizer:
        assert r["images"] == 2 and r["psnr"] > 10 and 0 < r["ssim"] <= 1 and 0 < r["codebook_usage"] < 0.2
        assert np.isfinite(r["rfid_clip_features"]) and r["rfid_clip_features"] >= 0


@pytest.mark.slow
def test_a_rerun_skips_every_finished_shard(evaluated):
    cfg, result, ev = evaluated
    marker = ev.path("stage1-step-00000002", "markers", "00000.done")
    before = os.path.getmtime(marker)
    again = evaluate.run(cfg, checkpoints=["stage1"], tokenizer=False)
    assert os.path.getmtime(marker) == before
    assert again.rows[0]["clip_score"] == pytest.approx(result.rows[1]["clip_score"])
    assert len(evaluate.read_metrics(ev)) == 2  # the line is replaced, not repeated


class FailsOnOddShards:
    def __call__(self, store, shard):
        if int(shard) % 2:
            raise RuntimeError(f"shard {shard} is broken")
        return {"images": 3, "rows_in": 3}


def test_a_failing_shard_is_recorded_and_the_others_finish(tmp_path, ray_local, capfd):
    from tessera.config.eval import EvalConfig

    store = ShardStore(str(tmp_path))
    run = evaluate.map_shards(store, ["00000", "00001", "00002"], FailsOnOddShards, {}, "fp",
                              EvalConfig(retries=1, num_workers=2), desc="eval: test images")
    assert sorted(run.done) == ["00000", "00002"] and list(run.failed) == ["00001"]
    bar = capfd.readouterr().err.replace("\r", "\n").splitlines()[-1]  # the bar's last state
    assert bar.startswith("eval: test images: 100%") and "img=6" in bar and "failed=1" in bar, bar
    assert "shard 00001 is broken" in store.read_json("markers", "00001.failed")["error"]
    assert store.done_info("markers", "00000.done".removesuffix(".done"))["fingerprint"] == "fp"
    rerun = evaluate.map_shards(store, ["00000", "00001", "00002"], FailsOnOddShards, {}, "fp",
                                EvalConfig(retries=0), desc="eval")
    assert rerun.skipped == 2 and list(rerun.failed) == ["00001"]
