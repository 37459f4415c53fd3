"""What the first GPU run relies on, checked on CPU: the shipped configs fit the memory they declare,
MFU's FLOPs against a hand count and a FLOP counter, gradient accumulation against one big batch,
asynchronous sharded checkpoints under a real two-process gloo group."""
import os
import socket

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from tessera.config import load_config
from tessera.config.train import TrainConfig
from tessera.core.store import ShardStore
from tessera.models.gpt import GPT, build_gpt, gpt_config, mfu, train_flops_per_sample
from tessera.training.checkpoint import Checkpointer, checkpoint_steps
from tessera.training.plan import GiB, HEADROOM, declared_fit
from tessera.training.step import split, train_step
from tests.conftest import REPO

SHIPPED = sorted((REPO / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", SHIPPED, ids=[p.name for p in SHIPPED])
def test_every_shipped_gpu_stage_fits_the_memory_it_declares(path):
    cfg = load_config(str(path))
    for stage in ("stage1", "stage2"):
        tcfg = getattr(cfg, stage)
        if tcfg is None or not tcfg.use_gpu:
            continue
        plan, allowed = declared_fit(tcfg)
        assert plan.total <= allowed, (f"{path.name} {stage}: {plan.total / GiB:.1f} GiB planned, "
                                        f"{HEADROOM:.0%} of {tcfg.gpu_memory_gib} GiB is {allowed / GiB:.1f}")


def test_a_gpu_stage_without_declared_memory_is_an_error():
    with pytest.raises(ValueError, match="gpu_memory_gib"):
        declared_fit(TrainConfig(use_gpu=True))


def test_stage1_as_shipped_fits_an_80_gb_card():
    tcfg = load_config(str(REPO / "configs" / "laion_coco_stage1.yaml")).stage1
    assert tcfg.gpu_memory_gib == 80
    plan, allowed = declared_fit(tcfg)
    assert plan.total <= allowed


def test_training_flops_by_hand():
    """GPT-nano at 64px: d 32, 2 layers, SwiGLU 96, vocabulary 256, caption 32, 120 text positions,
    16 image tokens, so the step runs T = 120 + 16 - 1 = 135 positions."""
    cfg = gpt_config("GPT-nano")
    assert (cfg.dim, cfg.n_layer, cfg.ffn_hidden, cfg.vocab_size, cfg.caption_dim) == (32, 2, 96, 256, 32)
    blocks = 6 * 2 * (4 * 32 * 32 + 3 * 32 * 96) * 135  # 6 per weight and position
    attention = 12 * 2 * 32 * 135 * 135  # 4 T^2 d forward, 8 T^2 d backward, per layer
    caption = (4 * 32 * 32 + 6 * 32 * 32) * 120  # no input gradient for the caption features
    head = 6 * 32 * 256 * 16  # image positions only
    assert blocks + attention + caption + head == 37_577_472
    assert train_flops_per_sample(cfg, 16) == 37_577_472
    # MFU: 100 samples/s against a 1 TFLOP/s peak.
    assert mfu(cfg, 16, 100.0, 1e12) == pytest.approx(37_577_472 * 100 / 1e12)


def test_training_flops_match_what_a_step_computes():
    """torch's FLOP counter over one forward and backward (attention on the math path, so that its
    matmuls are counted) counts exactly the formula's FLOPs."""
    model = build_gpt("GPT-nano", grid=4)
    torch.nn.init.normal_(model.output.weight, std=0.02)
    b = 3
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 256, (b, 16), generator=g)
    cond = torch.randn(b, 120, 32, generator=g)
    mask = torch.ones(b, 120, dtype=torch.bool)
    mask[:, :60] = False
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(codes[:, :-1], cond, mask).sum().backward()
    assert counter.get_total_flops() == b * train_flops_per_sample(model.cfg, 16)


def test_accumulated_micro_batches_give_the_gradient_of_the_whole_batch():
    """8 x 4 against 32 x 1 on CPU in fp32. SGD with lr 1 and no clipping makes the weight change the
    gradient itself. The two differ only in the order of fp32 sums over the batch's positions:
    at most n * eps relative for n summed terms, n = 32 samples x 135 positions."""
    cfg = gpt_config("GPT-nano", token_dropout=0.0, resid_dropout=0.0, ffn_dropout=0.0, class_dropout=0.0)
    g = torch.Generator().manual_seed(0)
    mask = torch.zeros(32, 120, dtype=torch.bool)
    for i in range(32):
        mask[i, 120 - (5 + 7 * i) % 120:] = True
    batch = {"codes": torch.randint(0, 256, (32, 16), generator=g), "cond": torch.randn(32, 120, 32, generator=g),
             "cond_mask": mask, "valid": torch.arange(32) >= 6}  # the first micro-batch: 2 captioned samples of 8
    tolerance = 32 * 135 * torch.finfo(torch.float32).eps
    HEAD_STD = 2.0  # a head far from uniform: per-sample losses differ, so a wrong average shows
    results = {}
    for micro in (8, 32):
        torch.manual_seed(0)
        model = GPT(cfg, grid=4)
        torch.nn.init.normal_(model.output.weight, std=HEAD_STD)
        before = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
        opt = torch.optim.SGD(model.parameters(), lr=1.0)
        out = train_step(model, opt, split(batch, micro), grad_clip=1e30)
        after = torch.cat([p.detach().flatten() for p in model.parameters()])
        results[micro] = (float(out["loss"]), float(out["grad_norm"]), before - after)
    (loss_a, norm_a, grad_a), (loss_w, norm_w, grad_w) = results[8], results[32]
    print(f"relative differences: loss {abs(loss_a - loss_w) / loss_w:.1e}, grad norm "
          f"{abs(norm_a - norm_w) / norm_w:.1e}, gradient {float((grad_a - grad_w).norm() / grad_w.norm()):.1e}; "
          f"tolerance {tolerance:.1e}")
    assert loss_a == pytest.approx(loss_w, rel=tolerance)
    assert norm_a == pytest.approx(norm_w, rel=tolerance)
    assert float((grad_a - grad_w).norm() / grad_w.norm()) < tolerance
    # Not vacuous: averaging the micro-batches' own means (their captioned samples differ in number)
    # would miss by far more than the tolerance.
    means = []
    for part in split(batch, 8):
        torch.manual_seed(0)
        model = GPT(cfg, grid=4)
        torch.nn.init.normal_(model.output.weight, std=HEAD_STD)
        means.append(float(train_step(model, torch.optim.SGD(model.parameters(), lr=0.0), [part])["loss"]))
    assert abs(sum(means) / len(means) - loss_w) > 4 * tolerance * loss_w


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _async_save_worker(rank: int, port: int, root: str, queue) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        torch.manual_seed(0)
        model = build_gpt("GPT-nano", grid=4)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        model(torch.zeros(1, 15, dtype=torch.long), torch.randn(1, 120, 32)).sum().backward()
        opt.step()
        run = ShardStore(root)
        ckpt = Checkpointer(run, keep=1, rank=rank, async_save=True)
        ckpt.save(1, model, opt, {"data": {}})
        ckpt.save(2, model, opt, {"data": {}})  # waits for the first, which is then pruned
        ckpt.wait()
        dist.barrier()
        fresh = build_gpt("GPT-nano", grid=4)
        fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=1e-3)
        fresh(torch.zeros(1, 15, dtype=torch.long), torch.randn(1, 120, 32)).sum().backward()
        fresh_opt.step()  # optimizer state to load into
        state = Checkpointer.load(run.url("checkpoints", "step-00000002"), fresh, fresh_opt)
        same = all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), fresh.state_dict().values()))
        queue.put((rank, ckpt._group is not None, same, state["step"], checkpoint_steps(run)))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_async_checkpoint_under_a_two_process_gloo_group(tmp_path):
    """The asynchronous save runs on its own gloo group (the one an NCCL default group lacks) with
    two real processes; the checkpoint loads back into both, and only the newest is kept."""
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_async_save_worker, args=(r, port, str(tmp_path), queue)) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=300)
    assert [p.exitcode for p in procs] == [0, 0]
    rows = sorted(queue.get(timeout=10) for _ in range(2))
    assert rows == [(0, True, True, 2, [2]), (1, True, True, 2, [2])]
    assert os.path.exists(tmp_path / "checkpoints" / "step-00000002" / ".metadata")


@pytest.mark.slow
def test_torchrun_launch_trains_on_two_workers_like_one(tmp_path):
    """`tessera stage1 --launcher torchrun`: two real torchrun processes set up their gloo group
    from torchrun's environment and train as two workers; without dropout, DDP over 2 x 2 samples
    gives one worker's losses over 4 (to fp32 rounding), so both workers really took part."""
    import subprocess
    import sys

    import yaml

    from tessera.pipelines import train
    from tessera.demo.codes import write_synthetic_codes
    from tessera.training.metrics import read_metrics

    write_synthetic_codes(ShardStore(str(tmp_path / "data")), 256, shards=2, per_shard=6, vocab=64, caption_dim=32)
    stage = {"model": "GPT-nano", "vocab_size": 64, "global_batch": 4, "max_steps": 3, "log_every": 1,
             "dropout": 0.0, "class_dropout": 0.0, "threads": 1, "tensorboard": False, "use_ray": False}
    config = {"name": "t", "data_root": str(tmp_path / "data"), "runs_root": str(tmp_path / "runs"),
              "models_root": str(tmp_path / "models"), "source": {"path": str(tmp_path / "src.parquet")},
              "stage1": stage}
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "tessera.cli", "stage1", "--config", str(path), "--launcher",
                           "torchrun", "--run", "two", "--set", "stage1.num_workers=2"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    two = [m["loss"] for m in read_metrics(str(tmp_path / "runs" / "two" / "stage1"))]
    one = train.run(load_config(str(path)), "stage1", run_name="one")
    assert one.step == 3 and len(two) == 3
    assert two == pytest.approx([m["loss"] for m in read_metrics(one.run_dir)], rel=1e-5)
    assert checkpoint_steps(ShardStore(str(tmp_path / "runs" / "two" / "stage1"))) == [3]


def test_selective_checkpointing_keeps_attention_outputs_flex_included():
    from torch.utils.checkpoint import CheckpointPolicy

    from tessera.training.parallel import _selective_policy

    for op in (torch.ops.higher_order.flex_attention, torch.ops.aten._scaled_dot_product_flash_attention.default,
               torch.ops.aten.mm.default):
        assert _selective_policy(None, op) == CheckpointPolicy.MUST_SAVE
    assert _selective_policy(None, torch.ops.aten.silu.default) == CheckpointPolicy.PREFER_RECOMPUTE


def test_static_decode_step_samples_the_same_tokens_and_compiles_once():
    """The static-cache decode step (whole cache, the position in a tensor) picks the same greedy
    tokens as the prefix-only step, and compiled it is one graph for every step and every call."""
    from torch._dynamo.utils import counters

    from tessera.models.generation import generate

    torch.manual_seed(0)
    model = build_gpt("GPT-nano", grid=4, token_dropout=0.0, resid_dropout=0.0, ffn_dropout=0.0, class_dropout=0.0)
    torch.nn.init.normal_(model.output.weight, std=0.5)  # varied logits: a wrong mask would change tokens
    cond = torch.randn(2, 120, 32)
    mask = torch.zeros(2, 120, dtype=torch.bool)
    mask[0, 100:], mask[1, 60:] = True, True
    expected = generate(model, cond, mask, temperature=0.0)
    assert len(set(expected.flatten().tolist())) > 4
    assert torch.equal(generate(model, cond, mask, temperature=0.0, decode_step=model.decode_step_static), expected)
    torch._dynamo.reset()
    before = counters["stats"]["unique_graphs"]
    compiled = torch.compile(model.decode_step_static, fullgraph=True, backend="aot_eager")
    for _ in range(2):
        assert torch.equal(generate(model, cond, mask, temperature=0.0, decode_step=compiled), expected)
    assert counters["stats"]["unique_graphs"] - before == 1
