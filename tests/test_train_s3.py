"""Training with data_root and runs_root in a bucket of a real S3 API server (moto's, on loopback):
sharded checkpoints (DCP), metrics.jsonl, TensorBoard events and sample grids written there, an
interrupted run resumed from its S3 checkpoint with the uninterrupted run's losses, and the sample
stage drawing from the S3 checkpoint into the bucket."""
from __future__ import annotations

import io

import fsspec
import pytest
from PIL import Image

from tessera.config import RunConfig
from tessera.config.storage import StorageConfig, apply_storage
from tessera.core.store import ShardStore
from tessera.demo.codes import write_synthetic_codes
from tessera.pipelines import sample, train
from tessera.training.checkpoint import checkpoint_steps, read_checkpoint_any
from tessera.training.metrics import read_tensorboard_scalars
from tests.s3server import s3_with_credentials

pytestmark = pytest.mark.usefixtures("one_thread")

STAGE1 = {"model": "GPT-nano", "vocab_size": 512, "global_batch": 4, "use_ray": False, "log_every": 1,
          "optim": {"lr_per_256": 0.2}, "data": {"resolution": 128}, "text_encoder": "tiny:t5", "vq": "tiny:vq",
          "max_steps": 4, "checkpoint_every": 2, "keep_checkpoints": 2, "sample_every": 4,
          "sample_prompts": ["a red circle"]}


@pytest.mark.slow  # a moto server, three short trainings and one sampling: about a minute on 2 cores
def test_training_checkpoints_metrics_and_samples_on_s3_resume_exactly(tmp_path):
    with s3_with_credentials() as endpoint:
        apply_storage(StorageConfig(endpoint=endpoint))
        fsspec.filesystem("s3").mkdir("train-runs")
        cfg = RunConfig.model_validate({
            "name": "t", "data_root": "s3://train-runs/data", "runs_root": "s3://train-runs/runs",
            "models_root": str(tmp_path / "models"), "source": {"path": str(tmp_path / "src.parquet")},
            "storage": {"endpoint": endpoint}, "stage1": STAGE1,
            "sample": {"vq": "tiny:vq", "text_encoder": "tiny:t5", "prompts": ["a blue square"],
                       "images_per_prompt": 2, "resolution": 128, "top_k": 50}})
        write_synthetic_codes(ShardStore(cfg.data_root), 128, shards=2, per_shard=6, vocab=512, caption_dim=32)

        whole = train.run(cfg, "stage1", run_name="whole")
        expected = [m["loss"] for m in train.read_metrics(whole.run_dir)]
        cut = train.run(cfg, "stage1", run_name="cut", stop_at=3)
        assert cut.step == 3 and checkpoint_steps(ShardStore(cut.run_dir)) == [2]
        resumed = train.run(cfg, "stage1", run_name="cut")  # from the S3 checkpoint at step 2

        assert resumed.run_dir == "s3://train-runs/runs/cut/stage1" and resumed.step == 4
        assert [m["step"] for m in train.read_metrics(resumed.run_dir)] == [1, 2, 3, 4]
        assert [m["loss"] for m in train.read_metrics(resumed.run_dir)] == pytest.approx(expected, rel=1e-5, abs=1e-6)
        assert len(set(expected)) == 4
        assert checkpoint_steps(ShardStore(resumed.run_dir)) == [2, 4]
        a, b = read_checkpoint_any(whole.checkpoint), read_checkpoint_any(resumed.checkpoint)
        assert a["step"] == b["step"] == 4 and a["data"] == b["data"]
        assert [s for s, _ in read_tensorboard_scalars(resumed.run_dir, "train/loss")] == [1, 2, 3, 4]
        grid = ShardStore(resumed.run_dir).list("samples")
        assert grid == ["step-00000004.png"]

        drawn = sample.run(cfg, run_name="cut")  # the newest checkpoint, read from S3
        assert drawn.checkpoint == resumed.checkpoint and drawn.grid.startswith("s3://train-runs/runs/cut/samples/")
        with fsspec.open(drawn.grid, "rb") as f:
            image = Image.open(io.BytesIO(f.read()))
        assert image.format == "PNG" and image.size[0] == 2 + 2 * 130 and drawn.images == 2
