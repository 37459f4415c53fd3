import math
import os

import pytest
import torch

from tessera.config import RunConfig
from tessera.config.train import TrainConfig
from tessera.models.gpt import build_gpt
from tessera.pipelines import train
from tessera.demo.codes import write_synthetic_codes
from tessera.core.store import ShardStore
from tessera.training import step as steps
from tessera.training.checkpoint import checkpoint_steps, read_checkpoint_any
from tests.conftest import REPO
from tests.tolerances import assert_adam_weights_agree

TINY = {"model": "GPT-nano", "vocab_size": 64, "global_batch": 4, "use_ray": False, "log_every": 1,
        "optim": {"lr_per_256": 0.2}}


pytestmark = pytest.mark.usefixtures("one_thread")


def _config(tmp_path, stage1: dict | None = None, stage2: dict | None = None, **sections) -> RunConfig:
    return RunConfig.model_validate({**sections,
        "name": "t", "data_root": str(tmp_path / "data"), "runs_root": str(tmp_path / "runs"),
        "models_root": str(tmp_path / "models"), "source": {"path": str(tmp_path / "src.parquet")},
        "stage1": {**TINY, **(stage1 or {})}, "stage2": {**TINY, **(stage2 or {})} if stage2 is not None else None})


@pytest.fixture
def data(tmp_path):
    store = ShardStore(str(tmp_path / "data"))
    write_synthetic_codes(store, 256, shards=2, per_shard=6, vocab=64, caption_dim=32)
    return store


def test_resumed_run_repeats_the_uninterrupted_losses(tmp_path, data):
    """Stop after 4 steps (the last checkpoint is at 2, as after a crash), rerun: the losses of the
    resumed steps equal those of an uninterrupted run, and metrics.jsonl reads like one run.
    12 samples in batches of 4, so the resumed steps cross an epoch boundary too."""
    stage1 = {"max_steps": 6, "checkpoint_every": 2, "keep_checkpoints": 2}
    whole = train.run(_config(tmp_path, stage1), "stage1", run_name="whole")
    expected = [m["loss"] for m in train.read_metrics(whole.run_dir)]
    assert len(expected) == 6 and whole.step == 6

    first = train.run(_config(tmp_path, stage1), "stage1", run_name="cut", stop_at=3)
    assert first.step == 3 and checkpoint_steps(ShardStore(first.run_dir)) == [2]
    resumed = train.run(_config(tmp_path, stage1), "stage1", run_name="cut")
    got = [m["loss"] for m in train.read_metrics(resumed.run_dir)]
    assert [m["step"] for m in train.read_metrics(resumed.run_dir)] == list(range(1, 7))
    assert got == pytest.approx(expected, rel=1e-5, abs=1e-6)
    assert len(set(got)) == 6  # the losses move: a resume that replayed batches would show it
    assert checkpoint_steps(ShardStore(resumed.run_dir)) == [4, 6]  # keeps the last two

    a, b = read_checkpoint_any(whole.checkpoint), read_checkpoint_any(resumed.checkpoint)
    assert a["data"] == b["data"] and a["step"] == b["step"] == 6 and a["data"]["epoch"] == 1
    for k in a["model"]:
        assert torch.allclose(a["model"][k], b["model"][k], atol=1e-6)
    assert set(a) >= {"model", "step", "data", "config"}


def test_stage2_starts_from_stage1_weights_only(tmp_path, data):
    write_synthetic_codes(data, 512, shards=1, per_shard=4, vocab=64, caption_dim=32)
    cfg = _config(tmp_path, {"max_steps": 3}, {"max_steps": 1, "init_from": "stage1", "rope_grid": 16,
                                             "data": {"resolution": 512}, "optim": {"lr_per_256": 0.0}})
    with pytest.raises(FileNotFoundError, match="train stage1 first"):
        train.run(cfg, "stage2")
    s1 = train.run(cfg, "stage1")
    s2 = train.run(cfg, "stage2")
    one, two = read_checkpoint_any(s1.checkpoint), read_checkpoint_any(s2.checkpoint)
    assert two["step"] == 1 and two["config"]["resolution"] == 512
    # Its 32x32 grid keeps stage 1's 16x16 rotary positions, and sampling builds it that way.
    assert two["config"]["model_config"]["rope_grid"] == 16
    from tessera.pipelines.sample import load_generator

    model, resolution = load_generator(s2.checkpoint, build_gpt("GPT-nano").cfg, None)
    assert resolution == 512 and model.cfg.rope_grid == 16
    text = model.cfg.cls_token_num
    stage1_rope = build_gpt("GPT-nano", grid=16).rope[text:].view(16, 16, -1, 2)
    assert torch.allclose(model.rope[text:].view(32, 32, -1, 2)[::2, ::2], stage1_rope, atol=1e-6)
    assert _full_checkpoint(s2.checkpoint, tmp_path)["optim"]["state"]["tok_embeddings.weight"]["step"] == 1  # fresh
    for k, v in one["model"].items():  # lr 0: the weights are still stage 1's
        assert torch.equal(two["model"][k], v), k
    # A rerun of stage 2 resumes stage 2 itself, not stage 1 again.
    assert train.train_job(cfg, "stage2").init_from == "stage1"


def _full_checkpoint(url: str, tmp_path) -> dict:
    """Everything in a sharded checkpoint (optimizer state too), as one torch.save file would hold it."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    dcp_to_torch_save(url, tmp_path / "full.pt")
    return torch.load(tmp_path / "full.pt", weights_only=True)


def test_gradient_accumulation_matches_one_big_batch(data):
    from tessera.training.data import CodesLoader
    from tessera.config.train import CodesDataConfig

    batch = CodesLoader(data, CodesDataConfig(), 4, prefetch=0).next_batch()
    halves = [{k: v[:2] for k, v in batch.items()}, {k: v[2:] for k, v in batch.items()}]
    cfg = TrainConfig(**TINY, dropout=0.0)
    models = []
    for micro in ([batch], halves):
        torch.manual_seed(0)
        model = build_gpt("GPT-nano", vocab_size=64, token_dropout=0.0, resid_dropout=0.0, ffn_dropout=0.0,
                          class_dropout=0.0)
        torch.nn.init.normal_(model.output.weight, std=0.02)
        opt = steps.build_optimizer(model, cfg, torch.device("cpu"))
        out = steps.train_step(model, opt, micro)
        models.append((model, out))
    assert float(models[0][1]["loss"]) == pytest.approx(float(models[1][1]["loss"]), rel=1e-5)
    assert_adam_weights_agree(models[0][0].state_dict(), models[1][0].state_dict(),
                              lr=TINY["optim"]["lr_per_256"] * TINY["global_batch"] / 256, steps=1)


def test_a_step_reads_the_noisy_inputs_and_scores_the_true_codes(data):
    from tessera.training.data import CodesLoader
    from tessera.config.train import CodesDataConfig

    batch = CodesLoader(data, CodesDataConfig(code_noise=0.3), 4, prefetch=0, vocab_size=64).next_batch()
    assert not torch.equal(batch["inputs"], batch["codes"])
    torch.manual_seed(0)
    model = build_gpt("GPT-nano", vocab_size=64, token_dropout=0.0, resid_dropout=0.0, ffn_dropout=0.0,
                      class_dropout=0.0)
    torch.nn.init.normal_(model.output.weight, std=0.02)
    with torch.no_grad():
        expected = steps.image_loss(model(batch["inputs"][:, :-1], batch["cond"], batch["cond_mask"]),
                                    batch["codes"], batch["valid"])
        clean = steps.image_loss(model(batch["codes"][:, :-1], batch["cond"], batch["cond_mask"]),
                                 batch["codes"], batch["valid"])
    opt = steps.build_optimizer(model, TrainConfig(**TINY, dropout=0.0), torch.device("cpu"))
    out = steps.train_step(model, opt, [batch])
    # The noisy and the clean inputs give losses further apart than the tolerance of the check.
    assert float(expected) != pytest.approx(float(clean), rel=1e-4)
    assert float(out["loss"]) == pytest.approx(float(expected), rel=1e-6)


def test_optimizer_follows_llamagen_defaults():
    cfg = TrainConfig(global_batch=512)
    model = build_gpt("GPT-nano")
    opt = steps.build_optimizer(model, cfg, torch.device("cpu"))
    decayed, plain = opt.param_groups
    assert decayed["weight_decay"] == 0.05 and plain["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decayed["params"]) and all(p.dim() == 1 for p in plain["params"])
    assert len(decayed["params"]) + len(plain["params"]) == len(list(model.parameters()))
    assert opt.defaults["lr"] == pytest.approx(2e-4) and opt.defaults["betas"] == (0.9, 0.95)


def test_warmup_and_cosine_schedule():
    cfg = TrainConfig(global_batch=256, max_steps=110, optim={"schedule": "cosine", "warmup_steps": 10})
    assert steps.lr_at(cfg, 0) == pytest.approx(1e-5) and steps.lr_at(cfg, 9) == pytest.approx(1e-4)
    assert steps.lr_at(cfg, 60) == pytest.approx(1e-4 * (0.1 + 0.9 * 0.5))
    assert steps.lr_at(cfg, 110) == pytest.approx(1e-5)
    assert steps.lr_at(TrainConfig(), 12345) == pytest.approx(1e-4)


def test_image_loss_ignores_samples_without_a_caption():
    logits = torch.randn(2, 4, 8)
    codes = torch.randint(0, 8, (2, 4))
    loss = steps.image_loss(logits, codes, torch.tensor([True, False]))
    assert loss == pytest.approx(float(torch.nn.functional.cross_entropy(logits[0], codes[0])), rel=1e-6)


def test_bad_batch_sizes_are_config_errors():
    with pytest.raises(ValueError, match="multiple of"):
        TrainConfig(global_batch=10, micro_batch=4)
    assert TrainConfig(global_batch=16, micro_batch=4, num_workers=2).grad_accum == 2


@pytest.mark.slow  # starting Ray Train workers takes most of a minute on 2 cores
def test_training_through_ray_train(tmp_path, data, ray_local, capfd):
    # Relative roots, as in the shipped configs: they must mean the same inside the Ray Train workers.
    cfg = _config(tmp_path, {"max_steps": 3, "use_ray": True, "checkpoint_every": 2})
    cfg = cfg.model_copy(update={k: os.path.relpath(getattr(cfg, k)) for k in ("data_root", "runs_root", "models_root")})
    result = train.run(cfg, "stage1")
    metrics = train.read_metrics(result.run_dir)
    assert [m["step"] for m in metrics] == [1, 2, 3] and result.step == 3
    assert checkpoint_steps(ShardStore(result.run_dir)) == [2, 3]
    assert {"loss", "grad_norm", "tokens_per_s", "images_per_s", "data_wait", "memory_gb"} <= set(metrics[0])
    assert all(math.isfinite(m["loss"]) for m in metrics)
    assert ShardStore(result.run_dir).list("tensorboard")
    printed = "".join(capfd.readouterr())
    assert "Started training worker group" in printed  # Ray's lines reach this capture
    assert "PreemptionWatcher" not in printed  # a local Ray starts no watcher for node drains


@pytest.mark.slow
def test_demo_config_loss_falls_well_below_log_vocab_and_grids_are_drawn(tmp_path):
    """The demo's stage-1 section as written (tiny GPT, tiny T5 and VQ, Ray Train), for its first
    60 steps, on learnable code shards shaped like the demo's (512-code vocabulary, 32-dim caption
    features)."""
    from tessera.config import load_config

    cfg = load_config(REPO / "configs" / "demo.yaml", [f"data_root={tmp_path / 'data'}", f"runs_root={tmp_path / 'runs'}",
                                            f"models_root={tmp_path / 'models'}", "stage1.sample_every=60",
                                            "stage1.max_steps=60", "stage1.checkpoint_every=60"])
    store = ShardStore(str(tmp_path / "data"))
    write_synthetic_codes(store, cfg.stage1.data.resolution, shards=2, per_shard=60, vocab=512, caption_dim=32,
                          classes=8)
    result = train.run(cfg, "stage1")
    assert result.step == cfg.stage1.max_steps
    assert result.last_loss < 0.5 * math.log(cfg.stage1.vocab_size), result.last_loss
    assert ShardStore(result.run_dir).list("samples") == ["step-00000060.png"]


def test_init_from_names_another_runs_stage_or_a_file(tmp_path):
    cfg = _config(tmp_path, stage2={"init_from": "other/stage1", "data": {"resolution": 512}})
    with pytest.raises(FileNotFoundError, match="'other' has no stage1"):
        train.train_job(cfg, "stage2")
    ShardStore(str(tmp_path / "runs" / "other" / "stage1")).write_bytes(b"x", "checkpoints", "step-00000007",
                                                                       ".metadata")
    assert train.train_job(cfg, "stage2").init_from.endswith("other/stage1/checkpoints/step-00000007")
    cfg.stage2.init_from = str(tmp_path / "t2i_XL_stage1_256.pt")
    with pytest.raises(FileNotFoundError, match="t2i_XL_stage1_256.pt' does not exist: fetch it with `tessera fetch"):
        train.train_job(cfg, "stage2")
    (tmp_path / "t2i_XL_stage1_256.pt").write_bytes(b"x")
    assert train.train_job(cfg, "stage2").init_from == str(tmp_path / "t2i_XL_stage1_256.pt")


def _distributed_worker(rank: int, parallel: str, root: str, port: int, queue) -> None:
    import os

    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        cfg = TrainConfig(**{**TINY, "global_batch": 4, "num_workers": 2, "max_steps": 3, "parallel": parallel,
                             "dropout": 0.0})
        out = train.train_worker(train.TrainJob(train=cfg, stage="stage1", run_dir=f"{root}/runs/{parallel}",
                                                data_root=f"{root}/data"))
        queue.put((parallel, rank, out["losses"]))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_ddp_and_fsdp2_on_two_workers_agree(tmp_path, data):
    """Two gloo processes (as torchrun would start them): DDP and FSDP2 give the same losses on
    every worker, and the FSDP2 checkpoint holds full, unsharded weights that load strictly."""
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    losses = {}
    for port, parallel in enumerate(("ddp", "fsdp"), start=29533):
        procs = [ctx.Process(target=_distributed_worker, args=(r, parallel, str(tmp_path), port, queue))
                 for r in range(2)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(timeout=300)
        assert [p.exitcode for p in procs] == [0, 0]
        for _ in range(2):
            name, rank, values = queue.get(timeout=10)
            losses[name, rank] = values
    assert losses["ddp", 0] == losses["ddp", 1] == pytest.approx(losses["fsdp", 0], rel=1e-5)
    ckpt = read_checkpoint_any(str(tmp_path / "runs" / "fsdp" / "checkpoints" / "step-00000003"))
    build_gpt("GPT-nano", vocab_size=64).load_state_dict(ckpt["model"], strict=True)


def test_a_short_text_prefix_model_trains_and_samples(tmp_path, data):
    """GPT-demo's 24-position prefix: the loader pads to it, the checkpoint keeps it, and the
    sample stage (tiny T5 and VQ through the real loaders) generates with it."""
    from tessera.pipelines import sample

    cfg = _config(tmp_path, {"model": "GPT-demo", "max_steps": 2, "threads": 1}, sample={
        "vq": "tiny:vq", "text_encoder": "tiny:t5", "top_k": 50, "prompts": ["a red circle on a blue background"]})
    result = train.run(cfg, "stage1")
    assert result.step == 2 and math.isfinite(result.last_loss)
    saved = read_checkpoint_any(result.checkpoint)["config"]["model_config"]
    assert saved["cls_token_num"] == 24
    out = sample.run(cfg)
    assert out.images == 1 and out.tokens_per_s > 0
