"""The eval stage with the llamagen_t2i protocol on the demo's tiny models: every row carries the
protocol's fields, images are measured at 256 whatever the checkpoint's resolution, and the
small N is flagged."""
import dataclasses

import pytest
import torch

from tessera.config import load_config
from tessera.core.store import ShardStore
from tessera.demo.flow import heldout_prompts
from tessera.models.gpt import build_gpt
from tessera.pipelines import evaluate
from tessera.training.checkpoint import Checkpointer

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.slow]


def _demo_eval(tmp_path, *overrides: str):
    """The demo's config on a few held-out prompts, and a stage-1 checkpoint of a nano GPT at 128px."""
    overrides = [
        f"data_root={tmp_path}/data", f"runs_root={tmp_path}/runs", f"models_root={tmp_path}/models",
        "eval.synthetic_prompts=2", "eval.images_per_prompt=1", "eval.shard_size=2", "eval.batch_size=2",
        "eval.tokenizer.enabled=false", *overrides]
    cfg = load_config("configs/demo.yaml", overrides + heldout_prompts(load_config("configs/demo.yaml", overrides)))
    torch.manual_seed(0)
    model = build_gpt("GPT-nano", grid=8, vocab_size=512)
    Checkpointer(ShardStore(f"{tmp_path}/runs/demo/stage1"), keep=1).save(
        2, model, torch.optim.AdamW(model.parameters()),
        {"config": {"stage": "stage1", "resolution": 128, "model_config": dataclasses.asdict(model.cfg)}})
    return cfg


def test_llamagen_protocol_rows_carry_every_field(tmp_path, ray_local):
    cfg = _demo_eval(tmp_path, "eval.protocol=llamagen_t2i")
    result = evaluate.run(cfg, checkpoints=["stage1"], tokenizer=False)
    row = result.rows[0]
    assert row["protocol"] == "llamagen_t2i" and row["resolution"] == 128 and row["eval_resolution"] == 256
    assert row["n_gen"] == 2 and row["n_ref"] == 2 and row["clip_model"] == cfg.eval.clip.model
    assert row["feature_extractor"].startswith("CLIP") and "N_gen 2 < 30000" in row["warning"]
    assert len(row["feature_weights_sha256"]) == 64  # the world CLIP is a folder: a digest of its files
    assert -1.0 <= row["clip_score"] <= 1.0  # a raw cosine, not 100 x cosine
    assert "clip_feature_frechet" in row
    assert row["prompt_following_chance"] <= row["prompt_following_color_chance"] <= 1  # floors beside figures


def test_a_failed_reference_shard_fails_the_distance_with_its_name(tmp_path, ray_local):
    cfg = _demo_eval(tmp_path, "eval.synthetic_prompts=4", "eval.retries=0")
    # The reference images of the second shard (prompts 2 and 3) are broken files: that shard fails.
    for i in (2, 3):
        (tmp_path / f"data/eval/heldout/images/{i:05d}.png").write_bytes(b"not a png")
    result = evaluate.run(cfg, checkpoints=["stage1"], tokenizer=False)
    row = result.rows[0]
    assert "clip_feature_frechet" not in row and "fid" not in row
    assert row["fid_error"].startswith("reference shard(s) failed: 00001 (") and "00000" not in row["fid_error"]
    assert "none of the shard's 2 images can be read" in row["fid_error"]  # the shard's own error
    assert list(result.failed[row["label"]]) == ["reference/00001"]
    assert row["images"] == 4 and "prompt_following" in row  # the rest of the row is measured
