"""The training package: accumulation through the worker loop, seeds, sharded checkpoints that
reshard across worker counts, FlexAttention against the dense mask, metrics on fsspec, export."""

import dataclasses

import pytest
import torch

from tessera.config.train import TrainConfig
from tessera.models.gpt import build_gpt
from tessera.pipelines import train
from tessera.demo.codes import write_synthetic_codes
from tessera.core.store import ShardStore
from tessera.training.checkpoint import checkpoint_steps, export, read_checkpoint_any, read_model_state
from tessera.training.metrics import read_tensorboard_scalars
from tessera.training.step import seed_step, step_seed
from tests.test_train import TINY, _config
from tests.tolerances import assert_adam_weights_agree

pytestmark = pytest.mark.usefixtures("one_thread")

# No randomness in the step, so different worker layouts must agree exactly.
STILL = {**TINY, "dropout": 0.0, "class_dropout": 0.0}


@pytest.fixture
def data(tmp_path):
    store = ShardStore(str(tmp_path / "data"))
    write_synthetic_codes(store, 256, shards=2, per_shard=6, vocab=64, caption_dim=32)
    return store


def _conf(tmp_path, name: str, stop_at=None, **train_cfg) -> train.TrainJob:
    return train.TrainJob(train=TrainConfig(**{**STILL, **train_cfg}), stage="stage1", stop_at=stop_at,
                          run_dir=str(tmp_path / "runs" / name), data_root=str(tmp_path / "data"))


def test_accumulation_through_the_worker_loop(tmp_path, data):
    """micro_batch = global/4 and = global: the same losses, gradients and weights, and the same
    samples consumed (each step is global_batch samples either way)."""
    whole = train.train_worker(_conf(tmp_path, "whole", max_steps=3, micro_batch=4))
    quarters = train.train_worker(_conf(tmp_path, "quarters", max_steps=3, micro_batch=1))
    assert quarters["losses"] == pytest.approx(whole["losses"], rel=1e-5)
    assert quarters["data"] == whole["data"] and whole["data"]["offset"] + 6 * whole["data"]["shard"] == 12
    m = {name: train.read_metrics(str(tmp_path / "runs" / name)) for name in ("whole", "quarters")}
    assert [x["grad_norm"] for x in m["quarters"]] == pytest.approx([x["grad_norm"] for x in m["whole"]], rel=1e-4)
    a = read_checkpoint_any(str(tmp_path / "runs" / "whole" / "checkpoints" / "step-00000003"))["model"]
    b = read_checkpoint_any(str(tmp_path / "runs" / "quarters" / "checkpoints" / "step-00000003"))["model"]
    # Reordered fp32 sums: tolerances from the arithmetic (tests/tolerances.py), not one CPU's figures.
    assert_adam_weights_agree(a, b, lr=STILL["optim"]["lr_per_256"] * STILL["global_batch"] / 256, steps=3)


def test_seeds_differ_per_rank_and_repeat_per_step():
    assert len({step_seed(0, rank, 5) for rank in range(8)}) == 8
    assert step_seed(0, 1, 5) == step_seed(0, 1, 5) != step_seed(0, 1, 6) != step_seed(1, 1, 6)
    draws = []
    for rank in (0, 1, 0):
        seed_step(0, rank, 3)
        draws.append(torch.rand(4))
    assert torch.equal(draws[0], draws[2]) and not torch.equal(draws[0], draws[1])


@pytest.mark.parametrize("text_rope", ["identity", "llamagen"])
def test_flex_attention_block_mask_equals_the_explicit_mask(text_rope):
    torch.manual_seed(0)
    model = build_gpt("GPT-nano", grid=4, text_rope=text_rope).eval()
    torch.nn.init.normal_(model.output.weight, std=0.02)
    cond = torch.randn(3, 120, 32)
    mask = torch.zeros(3, 120, dtype=torch.bool)
    mask[0, -5:], mask[1, -120:], mask[2, -37:] = True, True, True
    codes = torch.randint(0, 256, (3, 16))
    with torch.no_grad():
        dense = model(codes[:, :-1], cond, mask)
        model.attention = "flex"
        flex = model(codes[:, :-1], cond, mask)
        flex_causal = model(codes[:, :-1], cond, None)
        model.attention = "sdpa"
        causal = model(codes[:, :-1], cond, None)
    assert torch.allclose(flex, dense, atol=1e-5, rtol=1e-5)
    assert torch.allclose(flex_causal, causal, atol=1e-5, rtol=1e-5)


def _two_workers(rank: int, conf: train.TrainJob, port: int, queue) -> None:
    import os

    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        queue.put((rank, train.train_worker(conf)["losses"]))
    finally:
        dist.destroy_process_group()


def _on_two(conf: train.TrainJob, port: int) -> list[float]:
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_two_workers, args=(r, conf, port, queue)) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=300)
    assert [p.exitcode for p in procs] == [0, 0]
    out = dict(queue.get(timeout=10) for _ in range(2))
    assert out[0] == out[1]
    return out[0]


@pytest.mark.slow  # four gloo processes spawned: most of a minute on 2 idle cores
def test_sharded_checkpoint_resumes_on_another_number_of_workers(tmp_path, data):
    """FSDP2 on 2 gloo workers saves shards at step 2; 1 worker resumes from them. 1 worker saves;
    2 FSDP2 workers resume. Both give the loss of step 3 of an uninterrupted 1-worker run."""
    ref = train.train_worker(_conf(tmp_path, "ref", max_steps=3, checkpoint_every=2))["losses"]

    two = _conf(tmp_path, "two-to-one", stop_at=2, max_steps=3, checkpoint_every=2, num_workers=2, parallel="fsdp")
    first = _on_two(two, 29541)
    assert checkpoint_steps(ShardStore(two.run_dir)) == [2]
    assert len(ShardStore(two.run_dir).list("checkpoints/step-00000002", ".distcp")) == 2  # one part per rank
    then = train.train_worker(_conf(tmp_path, "two-to-one", max_steps=3, checkpoint_every=2))["losses"]

    one = _conf(tmp_path, "one-to-two", stop_at=2, max_steps=3, checkpoint_every=2)
    before = train.train_worker(one)["losses"]
    after = _on_two(_conf(tmp_path, "one-to-two", max_steps=3, checkpoint_every=2, num_workers=2,
                          parallel="fsdp"), 29542)
    assert first + then == pytest.approx(ref, rel=1e-5)
    assert before + after == pytest.approx(ref, rel=1e-5)
    assert len(set(ref)) == 3


def test_metrics_tensorboard_and_checkpoints_on_an_fsspec_runs_root(tmp_path, data):
    import fsspec

    runs = "memory://tessera-test-runs"
    fsspec.filesystem("memory").rm("/tessera-test-runs", recursive=True) \
        if fsspec.filesystem("memory").exists("/tessera-test-runs") else None
    cfg = _config(tmp_path, {"max_steps": 3, "checkpoint_every": 2}).model_copy(update={"runs_root": runs})
    first = train.run(cfg, "stage1", stop_at=2)
    result = train.run(cfg, "stage1")  # resumes from the checkpoint on memory://
    assert result.run_dir.startswith("memory://") and result.step == 3
    assert [m["step"] for m in train.read_metrics(result.run_dir)] == [1, 2, 3]
    losses = [loss for _, loss in read_tensorboard_scalars(result.run_dir, "train/loss")]
    assert [s for s, _ in read_tensorboard_scalars(result.run_dir, "train/loss")][-1] == 3
    assert losses[-1] == pytest.approx(train.read_metrics(result.run_dir)[-1]["loss"], rel=1e-6)
    assert first.checkpoint.startswith("memory://") and checkpoint_steps(ShardStore(result.run_dir)) == [2, 3]


def test_export_writes_one_llamagen_format_file(tmp_path, data):
    from tessera.pipelines.sample import load_generator

    result = train.run(_config(tmp_path, {"max_steps": 2, "text_rope": "llamagen"}), "stage1")
    out = export(result.checkpoint, str(tmp_path / "export" / "gpt.pt"), dtype=torch.bfloat16)
    saved = torch.load(out, weights_only=True)
    weights = read_model_state(result.checkpoint)
    assert set(saved["model"]) == set(weights) and saved["steps"] == 2
    assert all(v.dtype == torch.bfloat16 for v in saved["model"].values() if v.is_floating_point())
    model = build_gpt("GPT-nano", vocab_size=64)
    model.load_state_dict(saved["model"], strict=True)  # LlamaGen's loaders read `model` the same way
    loaded, res = load_generator(out, None, None)
    assert res == 256 and loaded.cfg.vocab_size == 64


@pytest.mark.parametrize("mode", ["off", "full"])
def test_memory_plan_matches_the_measured_peak_on_cpu(mode):
    """The plan's estimate of a small model's fp32 step on CPU within 20% of the peak resident
    memory two such steps really take (in a fresh process)."""
    from tessera.models.gpt import GPTConfig
    from tessera.training.plan import estimate, measure_cpu_peak

    cfg = GPTConfig(dim=256, n_layer=4, n_head=4, vocab_size=4096, caption_dim=256, multiple_of=256)
    planned = estimate(cfg, resolution=256, micro_batch=8, checkpointing=mode, bf16=False).total
    measured = measure_cpu_peak(cfg, 256, 8, mode)
    assert 0.8 < planned / measured < 1.2, (planned / 2**20, measured / 2**20)


def test_plan_names_a_micro_batch_that_fits_stage2_on_an_80gb_gpu():
    from tessera.config import load_config
    from tessera.training.plan import GiB, largest_micro_batch, plan_stage
    from tests.conftest import REPO

    stage2 = load_config(REPO / "configs" / "aesthetic_stage2.yaml", []).stage2
    assert stage2.model == "GPT-XL" and stage2.data.resolution == 512
    assert plan_stage(stage2).total < 0.9 * 80 * GiB  # as configured
    assert plan_stage(stage2, checkpointing="off", micro_batch=32).total > 80 * GiB  # why checkpointing
    assert largest_micro_batch(stage2, 80 * GiB, "full") == 32


def test_async_checkpoints_finish_and_resume(tmp_path, data):
    ref = train.train_worker(_conf(tmp_path, "sync", max_steps=3))["losses"]
    conf = _conf(tmp_path, "async", max_steps=3, checkpoint_every=1, keep_checkpoints=2, async_checkpoint=True)
    first = train.train_worker(dataclasses.replace(conf, stop_at=2))["losses"]
    assert checkpoint_steps(ShardStore(conf.run_dir)) == [1, 2]
    assert first + train.train_worker(conf)["losses"] == pytest.approx(ref, rel=1e-5)
    assert checkpoint_steps(ShardStore(conf.run_dir)) == [2, 3]


def test_flex_attention_is_refused_for_cpu_training_and_auto_picks_the_dense_mask():
    from tessera.training.parallel import Dist, parallelize

    with pytest.raises(ValueError, match="no CPU backward"):
        parallelize(build_gpt("GPT-nano"), TrainConfig(attention="flex"), Dist())
    assert parallelize(build_gpt("GPT-nano"), TrainConfig(), Dist()).attention == "sdpa"


def test_each_logged_step_reaches_the_driver_once_and_a_rerun_goes_on_from_there(tmp_path, data):
    rows: list[dict] = []
    cfg = _config(tmp_path, {"max_steps": 2})
    train.run(cfg, "stage1", on_step=rows.append)
    assert [r["step"] for r in rows] == [1, 2] and all("loss" in r for r in rows)
    train.run(_config(tmp_path, {"max_steps": 4}), "stage1", on_step=rows.append)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert train.step_line("stage1", 4, rows[-1]).startswith("stage1 step 4/4: loss ")
