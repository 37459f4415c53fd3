"""One run on one GPU that validates and measures training, sampling and scoring, in under 10 minutes.

Made for a bare GPU machine without network: it imports torch, numpy and the parts of tessera
whose own imports the kit's wheels satisfy (pydantic, PyYAML, fsspec, webdataset), never Ray,
open_clip or pyarrow. `make gpu-kit` builds that kit on a machine with network; docs/gpu.md gives the command.

    python -m bench.gpu_validate --out gpu-validate [--llamagen-src DIR] [--budget-s 480]
    python -m bench.gpu_validate --device cpu --tiny --out DIR      # every step, tiny, on CPU

Steps (results go to OUT/gpu_validate.json after every step; once --budget-s has passed, the steps
left are recorded as skipped with that reason; d runs last, as it takes longest):
  a. parity: compiled FlexAttention against the dense-mask path in bf16 (logits and two gradients,
     beside the bf16-vs-fp32 error of the dense path itself); our GPT against LlamaGen's in
     `llamagen` mode; host syncs per training step.
  b. accumulation: micro-batch 8 x 4 against 32 x 1 (loss and grad-norm difference); the output
     head and loss over stage 2's micro-batch, plain against chunked and compiled (errors, time,
     peak memory).
  c. a one-rank process group (NCCL beside gloo on GPU, gloo on CPU), FSDP2 and compile for three
     steps; DCP save of the model and optimizer, synchronous and asynchronous (seconds, GB).
  d. throughput and memory, dynamo reset between cases: stage 1 as shipped, stage 2 with selective
     and with full checkpointing, FlexAttention against dense SDPA: compile time, step time,
     tokens/s, MFU over all positions, peak memory against `tessera plan`, graphs compiled.
  e. the real worker loop on synthetic shards: six steps, a checkpoint at step 3, resume, the
     same losses; data wait, and loader batches/s for one of 8 ranks at global batch 512 (its own
     slice, from the stored member index, on one read thread and on an object store's eight).
  f. sampling at 256px, CFG 7.5: ours (eager, and its static-cache decode step compiled) against
     LlamaGen's sampler (eager, and compiled as their sample script compiles it), median tokens/s
     of repeats after warm-up; identical tokens under greedy decoding.
  g. scoring: a CLIP ViT-L/14 image tower with the aesthetic and NSFW heads, images/s; JPEG
     decoding on the GPU where torchvision is installed.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import json
import math
import os
import shutil
import socket
import statistics
import sys
import tempfile
import time
import traceback
import warnings

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from tessera.config import load_config
from tessera.config.train import CodesDataConfig, TrainConfig
from tessera.core.store import ShardStore
from tessera.models.aesthetic import AestheticHead
from tessera.models.chunked_loss import chunk_step, chunked_cross_entropy
from tessera.models.generation import generate
from tessera.models.gpt import GPT, gpt_config, train_flops_per_sample
from tessera.models.nsfw import NsfwHead
from tessera.training.checkpoint import Checkpointer
from tessera.demo.codes import write_synthetic_codes
from tessera.training.data import REMOTE_READ_THREADS, CodesLoader
from tessera.training.loop import PEAK_TFLOPS, TrainJob, train_worker
from tessera.training.metrics import read_metrics
from tessera.training.parallel import PROCESS_GROUP_BACKEND, Dist, apply_fsdp, parallelize
from tessera.training.plan import estimate
from tessera.training.step import build_optimizer, split, train_step

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = "gpu_validate.json"
# What the script needs of the torch it finds (the GPU image's, not the lock's).
NEEDS = {
    "FlexAttention": "torch.nn.attention.flex_attention",
    "FSDP2 fully_shard": "torch.distributed.fsdp.fully_shard",
    "DCP async_save": "torch.distributed.checkpoint.async_save",
    "selective checkpointing": "torch.utils.checkpoint.create_selective_checkpoint_contexts",
    "CUDA sync debug mode": "torch.cuda.set_sync_debug_mode",
}

# The sizes of a full run and of the tiny CPU run.
FULL = {"model": "GPT-XL", "res1": 256, "res2": 512, "parity_batch": 4, "accum": (8, 4), "loop_model": "GPT-B",
        "loop_res": 512, "loop_batch": 8, "loader_batch": 512, "loader_shards": 4, "loader_per_shard": 512,
        "sample_res": 256, "sample_batch": 8, "sample_repeats": 3, "vit": (224, 14, 1024, 24, 16, 768),
        "score_batch": 128, "warmup": 2, "steps": 5, "caption_dim": 2048,
        "loss_positions": 16 * 1024, "loss_chunk": TrainConfig().loss_chunk}
TINY = {"model": "GPT-nano", "res1": 64, "res2": 128, "parity_batch": 2, "accum": (2, 4), "loop_model": "GPT-nano",
        "loop_res": 128, "loop_batch": 4, "loader_batch": 64, "loader_shards": 2, "loader_per_shard": 64,
        "sample_res": 64, "sample_batch": 2, "sample_repeats": 3, "vit": (64, 16, 64, 2, 2, 32),
        "score_batch": 4, "warmup": 1, "steps": 2, "caption_dim": 32,
        "loss_positions": 2 * 256, "loss_chunk": 128}


class Run:
    """The results file and the time budget."""

    def __init__(self, out: str, budget_s: float, meta: dict):
        self.path = os.path.join(out, RESULTS)
        self.deadline = time.monotonic() + budget_s
        self.budget_s = budget_s
        self.data = {"meta": meta, "steps": {}}
        self.write()

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def write(self) -> None:
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(self.data, f, indent=2, default=_jsonable)
        os.replace(tmp, self.path)

    def step(self, name: str, fn, *args) -> None:
        if self.left() <= 0:
            row = {"skipped": f"the time budget of {self.budget_s:.0f} s was spent before this step"}
        else:
            print(f"== {name}", flush=True)
            start = time.monotonic()
            try:
                row = fn(self, *args)
            except Exception as e:  # noqa: BLE001 - one failed step must not stop the others
                traceback.print_exc()
                row = {"error": f"{type(e).__name__}: {e}"[:2000]}
            row["seconds"] = time.monotonic() - start
            _cleanup()
        self.data["steps"][name] = row
        print("   " + json.dumps(row, default=_jsonable)[:3000], flush=True)
        self.write()


def _jsonable(x):
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, torch.Tensor):
        return x.tolist()
    return str(x)


def _cleanup() -> None:
    torch._dynamo.reset()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# Shared pieces ---------------------------------------------------------------------------------
class Env:
    def __init__(self, args):
        self.device = torch.device(args.device)
        self.cuda = self.device.type == "cuda"
        self.sizes = TINY if args.tiny else FULL
        self.tiny = args.tiny
        self.out = args.out
        self.llamagen_src = args.llamagen_src
        # The CPU smoke run traces with dynamo and AOTAutograd but skips code generation (minutes on CPU).
        self.backend = args.compile_backend or ("aot_eager" if args.tiny and not self.cuda else "inductor")
        self.dtype = torch.bfloat16 if self.cuda else torch.float32
        self.autocast = torch.bfloat16 if self.cuda else None

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def peak_flops(self) -> float:
        if not self.cuda:
            return 0.0
        name = torch.cuda.get_device_name(self.device)
        return next((v for k, v in PEAK_TFLOPS.items() if k in name), 0.0) * 1e12

    def peak_memory(self) -> float | None:
        return torch.cuda.max_memory_allocated(self.device) / 2**30 if self.cuda else None

    def reset_memory(self) -> None:
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)


def no_dropout(name: str, **overrides):
    return gpt_config(name, token_dropout=0.0, resid_dropout=0.0, ffn_dropout=0.0, class_dropout=0.0, **overrides)


def random_batch(cfg, batch: int, grid: int, seed: int = 0) -> dict:
    """Codes, caption features and masks of captions of different lengths, on the CPU."""
    g = torch.Generator().manual_seed(seed)
    text = cfg.cls_token_num
    mask = torch.zeros(batch, text, dtype=torch.bool)
    for i in range(batch):
        mask[i, text - (5 + 13 * i) % text:] = True
    return {"codes": torch.randint(0, cfg.vocab_size, (batch, grid * grid), generator=g),
            "cond": torch.randn(batch, text, cfg.caption_dim, generator=g) * mask[..., None],
            "cond_mask": mask, "valid": torch.ones(batch, dtype=torch.bool)}


def build(cfg, grid: int, device, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    with torch.device(device):
        model = GPT(cfg, grid=grid)
    nn.init.normal_(model.output.weight, std=cfg.init_std)  # a zero head would make every logit equal
    return model


@contextlib.contextmanager
def full_fp32():
    """fp32 matmuls without TF32 (enabled for the rest of the run): the references are exact fp32."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().float(), b.detach().float()
    return float((a - b).norm() / b.norm().clamp(min=1e-30))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def dir_gb(path: str) -> float:
    return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(path) for f in fs) / 1e9


def import_llamagen(src: str | None):
    """LlamaGen's model code from its checkout or the kit's copy; None when there is neither."""
    if not src or not os.path.isdir(os.path.join(src, "autoregressive")):
        return None
    from bench.vs_llamagen import import_llamagen as load

    return load(src)


# a. Parity ------------------------------------------------------------------------------------
def step_parity(run: Run, env: Env) -> dict:
    s = env.sizes
    grid = s["res1"] // 16
    cfg = no_dropout(s["model"])
    batch = random_batch(cfg, s["parity_batch"], grid)
    codes, cond, mask = (batch[k].to(env.device) for k in ("codes", "cond", "cond_mask"))
    probes = ("layers.0.attention.wqkv.weight", "layers.0.feed_forward.w2.weight")

    def forward_backward(model: GPT, autocast, backward: bool = True):
        model.zero_grad(set_to_none=True)
        with torch.autocast(env.device.type, dtype=autocast, enabled=autocast is not None):
            logits = model(codes[:, :-1], cond, mask)
        if not backward:
            return logits.detach(), {}
        logits.float().logsumexp(-1).mean().backward()
        params = dict(model.named_parameters())
        return logits.detach(), {p: params[p].grad.detach().clone() for p in probes}

    reference = build(cfg, grid, env.device)
    with full_fp32():
        ref_logits, ref_grads = forward_backward(reference, None)  # dense, fp32
    dense_logits, dense_grads = forward_backward(reference, env.autocast)  # dense, bf16 on GPU
    flex = copy.deepcopy(reference)
    flex.attention = "flex"
    for i, block in enumerate(flex.layers):
        flex.layers[i] = torch.compile(block, backend=env.backend)
    row = {"model": s["model"], "res": s["res1"], "batch": s["parity_batch"], "dtype": str(env.dtype),
           "dense_vs_fp32_logits_rel_err": rel_err(dense_logits, ref_logits)}
    start = time.perf_counter()
    if env.cuda:
        flex_logits, flex_grads = forward_backward(flex, env.autocast)
        for p in probes:
            row[f"flex_vs_dense_grad_rel_err[{p}]"] = rel_err(flex_grads[p], dense_grads[p])
            row[f"dense_vs_fp32_grad_rel_err[{p}]"] = rel_err(dense_grads[p], ref_grads[p])
    else:
        with torch.no_grad():
            flex_logits, _ = forward_backward(flex, env.autocast, backward=False)
        row["gradients"] = "not compared: FlexAttention has no backward on CPU"
    env.sync()
    row["flex_compile_s"] = time.perf_counter() - start
    row["flex_vs_dense_logits_rel_err"] = rel_err(flex_logits, dense_logits)
    del flex

    theirs_code = import_llamagen(env.llamagen_src)
    if theirs_code is None:
        row["llamagen"] = "not compared: no LlamaGen source (--llamagen-src, LLAMAGEN_SRC or the kit's copy)"
    else:
        from bench.vs_llamagen import their_mask

        ours = build(no_dropout(s["model"], text_rope="llamagen"), grid, env.device)
        theirs = theirs_code[0](ours.cfg, grid).to(env.device)
        theirs.load_state_dict(ours.state_dict(), strict=True)
        for m in (ours, theirs):
            m.train()
            for d in m.modules():
                if isinstance(d, nn.Dropout):
                    d.p = 0.0
        theirs.cls_embedding.uncond_prob = 0.0
        with torch.no_grad(), full_fp32():
            a = ours(codes[:, :-1], cond, mask)
            b, _ = theirs(idx=codes[:, :-1], cond_idx=cond, targets=codes,
                          mask=their_mask(mask.cpu(), grid * grid).to(env.device),
                          valid=torch.ones(len(codes), dtype=torch.bool, device=env.device))
        row["llamagen_logits_max_abs_diff"] = float((a - b).abs().max())
        row["llamagen_logits_rel_err"] = rel_err(a, b)
        del ours, theirs

    # Host syncs in one training step (after a warm-up step): CUDA's sync debug mode warns on each.
    model = build(cfg, grid, env.device)
    opt = build_optimizer(model, TrainConfig(model=s["model"], global_batch=s["parity_batch"]), env.device)
    train_step(model, opt, [batch], device=env.device, autocast_dtype=env.autocast)
    env.sync()
    if env.cuda:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                train_step(model, opt, [batch], device=env.device, autocast_dtype=env.autocast)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        syncs = [str(w.message).splitlines()[0] for w in caught if "synchroniz" in str(w.message)]
        row["host_syncs_per_step"] = len(syncs)
        row["host_sync_ops"] = sorted(set(syncs))[:10]
    else:
        row["host_syncs_per_step"] = "not measured: a CPU has no device to wait for"
    return row


# b. Accumulation --------------------------------------------------------------------------------
def step_accumulation(run: Run, env: Env) -> dict:
    s = env.sizes
    micro, n = s["accum"]
    grid = s["res1"] // 16
    cfg = no_dropout(s["model"])
    batch = random_batch(cfg, micro * n, grid, seed=1)
    tcfg = TrainConfig(model=s["model"], global_batch=micro * n)
    out, weights = {}, {}
    for name, mb in (("accumulated", micro), ("whole", micro * n)):
        model = build(cfg, grid, env.device)
        opt = build_optimizer(model, tcfg, env.device)
        out[name] = train_step(model, opt, split(batch, mb), device=env.device, autocast_dtype=env.autocast)
        weights[name] = model.layers[0].attention.wqkv.weight.detach().clone()
        del model, opt
    la, lw = float(out["accumulated"]["loss"]), float(out["whole"]["loss"])
    ga, gw = float(out["accumulated"]["grad_norm"]), float(out["whole"]["grad_norm"])
    return {"model": s["model"], "micro_batches": f"{micro} x {n} against {micro * n} x 1", "dtype": str(env.dtype),
            "loss_accumulated": la, "loss_whole": lw, "loss_rel_diff": abs(la - lw) / abs(lw),
            "grad_norm_accumulated": ga, "grad_norm_whole": gw, "grad_norm_rel_diff": abs(ga - gw) / abs(gw),
            "updated_weights_rel_err": rel_err(weights["accumulated"], weights["whole"]),
            "loss_head": loss_head(env)}


def loss_head(env: Env) -> dict:
    """The output head and loss over stage 2's micro-batch (16 x 1024 positions at full size), the
    plain way (whole fp32 logits) against the chunked, compiled loss that training uses: the
    relative error of the loss and of both gradients, step time and peak memory of each."""
    s = env.sizes
    cfg = no_dropout(s["model"])
    n, chunk = s["loss_positions"], s["loss_chunk"]
    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(n, cfg.dim, generator=g).to(env.device, env.dtype)
    weight = (torch.randn(cfg.vocab_size, cfg.dim, generator=g) * cfg.init_std).to(env.device)
    targets = torch.randint(0, cfg.vocab_size, (n,), generator=g).to(env.device)
    scale = torch.full((n,), 1 / n, device=env.device)
    compiled = torch.compile(chunk_step, backend=env.backend, dynamic=False)

    def plain(h, w):
        return (F.cross_entropy(F.linear(h, w).float(), targets, reduction="none") * scale).sum()

    def chunked(h, w):
        return chunked_cross_entropy(h, w, targets, scale, chunk, compiled)

    out = {"positions": n, "vocab": cfg.vocab_size, "chunk": min(chunk, n)}
    results = {}
    for name, fn in (("plain", plain), ("chunked", chunked)):
        times = []
        for _ in range(s["warmup"] + s["steps"]):
            h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
            env.sync()
            env.reset_memory()
            base = torch.cuda.memory_allocated(env.device) if env.cuda else 0
            start = time.perf_counter()
            autocast = torch.autocast("cuda", dtype=env.autocast) if env.autocast else contextlib.nullcontext()
            with autocast:
                loss = fn(h, w)
            loss.backward()
            env.sync()
            times.append(time.perf_counter() - start)
        peak = env.peak_memory()
        results[name] = (loss.detach(), h.grad, w.grad)
        out[f"{name}_step_s"] = statistics.median(times[s["warmup"]:])
        out[f"{name}_peak_gib"] = None if peak is None else peak - base / 2**30
        del h, w, loss
    (lp, hp, wp), (lc, hc, wc) = results["plain"], results["chunked"]
    out.update({"loss_rel_err": abs(float(lc) - float(lp)) / abs(float(lp)), "grad_hidden_rel_err": rel_err(hc, hp),
                "grad_weight_rel_err": rel_err(wc, wp), "speedup": out["plain_step_s"] / out["chunked_step_s"]})
    return out


# c. Process group, FSDP2, DCP -------------------------------------------------------------------
def step_distributed(run: Run, env: Env) -> dict:
    s = env.sizes
    grid = s["res1"] // 16
    backend = PROCESS_GROUP_BACKEND if env.cuda else "gloo"
    own_group = not dist.is_initialized()
    if own_group:
        if env.cuda:
            torch.cuda.set_device(env.device)
        dist.init_process_group(backend=backend, init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    folder = tempfile.mkdtemp(prefix="dcp-", dir=env.out)
    try:
        cfg = gpt_config(s["model"])
        tcfg = TrainConfig(model=s["model"], global_batch=2, compile=True, parallel="fsdp",
                           activation_checkpointing="selective", attention="sdpa")
        model = parallelize(build(cfg, grid, env.device), tcfg, Dist(device=env.device), env.backend)
        apply_fsdp(model, bf16=env.cuda)
        opt = build_optimizer(model, tcfg, env.device)
        batch = random_batch(cfg, 2, grid, seed=2)
        losses, times = [], []
        for _ in range(3):
            start = time.perf_counter()
            losses.append(train_step(model, opt, [batch], device=env.device, autocast_dtype=env.autocast)["loss"])
            env.sync()
            times.append(time.perf_counter() - start)
        row = {"backend": backend, "world": dist.get_world_size(), "model": s["model"], "fsdp2": True,
               "compile_backend": env.backend, "losses": [float(x) for x in losses], "first_step_s": times[0],
               "step_s": statistics.median(times[1:])}
        store = ShardStore(folder)
        for mode in ("sync", "async"):
            ckpt = Checkpointer(store, keep=2, async_save=mode == "async")
            start = time.perf_counter()
            url = ckpt.save(1 if mode == "sync" else 2, model, opt, {})
            blocked = time.perf_counter() - start
            ckpt.wait()
            row[f"dcp_{mode}_blocking_s"] = blocked
            row[f"dcp_{mode}_total_s"] = time.perf_counter() - start
            row[f"dcp_{mode}_gb"] = dir_gb(url)
        # A step after the asynchronous save: the training goes on with the same weights.
        losses.append(train_step(model, opt, [batch], device=env.device, autocast_dtype=env.autocast)["loss"])
        row["loss_after_saves"] = float(losses[-1])
        return row
    finally:
        shutil.rmtree(folder, ignore_errors=True)
        if own_group:
            dist.destroy_process_group()


# d. Throughput ----------------------------------------------------------------------------------
def throughput_cases(env: Env) -> list[tuple[str, TrainConfig]]:
    """(name, config) of each case: the shipped stage configs, as shipped, and variants of stage 2."""
    if env.tiny:
        base = dict(model=env.sizes["model"], use_gpu=env.cuda, compile=True, global_batch=2)
        stage1 = TrainConfig(**base, data=CodesDataConfig(resolution=env.sizes["res1"]), activation_checkpointing="off")
        stage2 = TrainConfig(**base, data=CodesDataConfig(resolution=env.sizes["res2"]),
                             activation_checkpointing="selective")
    else:
        stage1 = load_config(os.path.join(REPO, "configs", "laion_coco_stage1.yaml")).stage1
        stage2 = load_config(os.path.join(REPO, "configs", "aesthetic_stage2.yaml")).stage2
    flex = "flex" if env.cuda else "sdpa"  # FlexAttention trains on GPU only
    return [("stage1 as shipped", stage1),
            ("stage2 selective, flex", stage2.model_copy(update={"attention": flex})),
            ("stage2 full, flex", stage2.model_copy(update={"attention": flex, "activation_checkpointing": "full"})),
            ("stage2 selective, dense SDPA", stage2.model_copy(update={"attention": "sdpa"}))]


def throughput_case(env: Env, tcfg: TrainConfig) -> dict:
    s = env.sizes
    micro = tcfg.micro_batch_for(tcfg.num_workers)
    res, grid = tcfg.data.resolution, tcfg.data.resolution // 16
    cfg = gpt_config(tcfg.model, vocab_size=tcfg.vocab_size, caption_dim=tcfg.caption_dim or s["caption_dim"])
    env.reset_memory()
    graphs_before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    model = parallelize(build(cfg, grid, env.device), tcfg, Dist(device=env.device), env.backend)
    opt = build_optimizer(model, tcfg, env.device)
    batch = random_batch(cfg, micro, grid, seed=3)
    if env.cuda:
        batch = {k: v.pin_memory() for k, v in batch.items()}
    start = time.perf_counter()
    train_step(model, opt, [batch], device=env.device, autocast_dtype=env.autocast)
    env.sync()
    compile_s = time.perf_counter() - start
    for _ in range(s["warmup"] - 1):
        train_step(model, opt, [batch], device=env.device, autocast_dtype=env.autocast)
    env.sync()
    start = time.perf_counter()
    for _ in range(s["steps"]):
        out = train_step(model, opt, [batch], device=env.device, autocast_dtype=env.autocast)
    env.sync()
    step_s = (time.perf_counter() - start) / s["steps"]
    peak = env.peak_flops()
    positions = cfg.cls_token_num + grid * grid - 1
    plan = estimate(cfg, resolution=res, micro_batch=micro, checkpointing=tcfg.activation_checkpointing,
                    bf16=env.cuda)
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"] - graphs_before
    return {"model": tcfg.model, "res": res, "micro_batch": micro, "checkpointing": tcfg.activation_checkpointing,
            "attention": model.attention, "compile": tcfg.compile, "compile_s": compile_s, "step_s": step_s,
            "image_tokens_per_s": micro * grid * grid / step_s, "positions_per_s": micro * positions / step_s,
            "mfu": train_flops_per_sample(cfg, grid * grid) * micro / step_s / peak if peak else None,
            "tflops_per_s": train_flops_per_sample(cfg, grid * grid) * micro / step_s / 1e12,
            "peak_gib": env.peak_memory(), "plan_gib": plan.total / 2**30, "graphs": graphs,
            "loss": float(out["loss"])}


def step_throughput(run: Run, env: Env) -> dict:
    row = {}
    for name, tcfg in throughput_cases(env):
        if run.left() <= 0:
            row[name] = {"skipped": "the time budget was spent"}
            continue
        _cleanup()  # each case compiles afresh: no shapes of the one before, no dynamic-shape graphs
        print(f"   -- {name}", flush=True)
        try:
            row[name] = throughput_case(env, tcfg)
        except torch.cuda.OutOfMemoryError as e:
            row[name] = {"error": f"out of memory: {str(e).splitlines()[0]}"}
        print("      " + json.dumps(row[name], default=_jsonable), flush=True)
        run.write()
    return row


# e. The worker loop and the loader -----------------------------------------------------------------
def step_loop(run: Run, env: Env) -> dict:
    s = env.sizes
    root = tempfile.mkdtemp(prefix="loop-", dir=env.out)
    try:
        cfg = gpt_config(s["loop_model"])
        data = ShardStore(os.path.join(root, "data"))
        write_synthetic_codes(data, s["loop_res"], shards=2, per_shard=4 * s["loop_batch"], vocab=cfg.vocab_size,
                              caption_dim=s["caption_dim"], seed=4)
        tcfg = TrainConfig(model=s["loop_model"], use_ray=False, use_gpu=env.cuda, compile=env.cuda,
                           activation_checkpointing="selective", data=CodesDataConfig(resolution=s["loop_res"]),
                           global_batch=s["loop_batch"], max_steps=6, checkpoint_every=3, log_every=1,
                           tensorboard=False, keep_checkpoints=3)
        job = TrainJob(train=tcfg, stage="stage2", run_dir=os.path.join(root, "straight"), data_root=data.root)
        start = time.perf_counter()
        straight = train_worker(job)
        straight_s = time.perf_counter() - start
        metrics = read_metrics(job.run_dir)
        # The same run stopped after its step-3 checkpoint, then resumed from it.
        resumed_dir = os.path.join(root, "resumed")
        train_worker(dataclasses.replace(job, run_dir=resumed_dir, stop_at=3))
        resumed = train_worker(dataclasses.replace(job, run_dir=resumed_dir))
        tail = straight["losses"][3:]
        row = {"model": s["loop_model"], "res": s["loop_res"], "global_batch": s["loop_batch"],
               "losses": straight["losses"], "resumed_losses": resumed["losses"],
               "resume_max_abs_diff": max(abs(a - b) for a, b in zip(tail, resumed["losses"])),
               "resume_equal": tail == resumed["losses"], "six_steps_s": straight_s,
               "data_wait_share": statistics.mean(m["data_wait"] for m in metrics[1:])}
        row.update(loader_rate(env, root))
        return row
    finally:
        shutil.rmtree(root, ignore_errors=True)


def loader_rate(env: Env, root: str) -> dict:
    """Batches/s of one of 8 ranks' loaders at the full global batch, stored caption features: the
    rank reads its own slice only, through the shards' stored member index, on one read thread
    (the default on a local disk) and on the threads an object store gets by default. Timed
    without the prefetch thread, so the figure is the reading itself; training overlaps it with
    the step."""
    s = env.sizes
    store = ShardStore(os.path.join(root, "loader"))
    write_synthetic_codes(store, s["res2"], shards=s["loader_shards"], per_shard=s["loader_per_shard"],
                          vocab=256, caption_dim=s["caption_dim"], seed=5)
    row = {"loader_global_batch": s["loader_batch"], "loader_rank_of": 8, "loader_res": s["res2"]}
    for name, n_threads in (("one_thread", 1), ("remote_threads", REMOTE_READ_THREADS)):
        loader = CodesLoader(store, CodesDataConfig(resolution=s["res2"], text="stored", read_threads=n_threads),
                             s["loader_batch"], rank=0, world=8, caption_dim=s["caption_dim"], pin_memory=env.cuda,
                             prefetch=0)
        try:
            loader.next_batch()  # the first batch opens the shards
            n = max(1, s["loader_shards"] * s["loader_per_shard"] // s["loader_batch"] - 1)
            start = time.perf_counter()
            for _ in range(n):
                loader.next_batch()
            seconds = time.perf_counter() - start
            row["loader_tar_headers_read"] = loader.header_reads
        finally:
            loader.close()
        row[f"loader_batches_per_s_{name}"] = n / seconds
    row["loader_batches_per_s"] = row["loader_batches_per_s_one_thread"]  # the default on a local disk
    row[f"loader_{REMOTE_READ_THREADS}_threads_on_local_disk_ratio"] = (row["loader_batches_per_s_remote_threads"]
                                                                        / row["loader_batches_per_s_one_thread"])
    return row


# f. Sampling -------------------------------------------------------------------------------------
def step_sampling(run: Run, env: Env) -> dict:
    s = env.sizes
    grid = s["sample_res"] // 16
    n_image = grid * grid
    cfg = no_dropout(s["model"], text_rope="llamagen")
    b = s["sample_batch"]
    batch = random_batch(cfg, b, grid, seed=6)
    cond, mask = batch["cond"].to(env.device), batch["cond_mask"].to(env.device)
    ours = build(cfg, grid, env.device).eval()
    row = {"model": s["model"], "res": s["sample_res"], "batch": b, "cfg_scale": 7.5, "dtype": str(env.dtype),
           "repeats": s["sample_repeats"]}
    theirs_code = import_llamagen(env.llamagen_src)
    theirs = None
    if theirs_code is not None:
        theirs = theirs_code[0](ours.cfg, grid).to(env.device).eval()
        theirs.load_state_dict(ours.state_dict(), strict=True)
        their_generate = theirs_code[2]

    def ours_greedy(model, c, m):
        return generate(model, c, m, cfg_scale=7.5, temperature=0.0)

    def theirs_greedy(model, c, m):
        return their_generate(model, c, n_image, emb_masks=m, cfg_scale=7.5, sample_logits=False, top_k=0)

    # Greedy tokens in fp32: the two implementations must pick the same codes.
    if theirs is not None:
        with full_fp32():
            a = ours_greedy(ours, cond[:1], mask[:1])
            t = theirs_greedy(theirs, cond[:1], mask[:1])
        row["greedy_tokens_identical_fp32"] = bool(torch.equal(a.cpu(), t.long().cpu()))
        row["greedy_tokens_agree_share_fp32"] = float((a.cpu() == t.long().cpu()).float().mean())
    else:
        row["llamagen"] = "not compared: no LlamaGen source (--llamagen-src, LLAMAGEN_SRC or the kit's copy)"

    # Timing in the run's dtype: warm-up, then the median of repeats.
    ours.to(env.dtype)
    cond_t = cond.to(env.dtype)

    def timed(fn, model) -> tuple[float, torch.Tensor]:
        fn(model, cond_t, mask)  # warm-up (and compilation)
        env.sync()
        times, tokens = [], None
        for _ in range(s["sample_repeats"]):
            start = time.perf_counter()
            tokens = fn(model, cond_t, mask)
            env.sync()
            times.append(time.perf_counter() - start)
        return b * n_image / statistics.median(times), tokens

    row["ours_eager_tokens_per_s"], ours_tokens = timed(ours_greedy, ours)
    # Compiled: the static-cache decode step, CUDA graphs on GPU.
    mode = "reduce-overhead" if env.cuda else None
    backend = "inductor" if env.cuda else env.backend
    decode = torch.compile(ours.decode_step_static, mode=mode, fullgraph=True, backend=backend)
    row["ours_tokens_per_s"], compiled_tokens = timed(
        lambda model, c, m: generate(model, c, m, cfg_scale=7.5, temperature=0.0, decode_step=decode), ours)
    row["compile_mode"] = f"{mode or 'default'}, {backend}"
    row["ours_compiled_agree_share"] = float((compiled_tokens.cpu() == ours_tokens.cpu()).float().mean())
    if theirs is not None:
        theirs.to(env.dtype)
        row["llamagen_eager_tokens_per_s"], their_tokens = timed(theirs_greedy, theirs)
        row["greedy_tokens_agree_share"] = float((ours_tokens.cpu() == their_tokens.long().cpu()).float().mean())
        _cleanup()
        # As their sample script compiles it: the whole model, CUDA graphs on GPU.
        compiled = torch.compile(theirs, mode=mode, fullgraph=True, backend=backend)
        row["llamagen_compiled_tokens_per_s"], _ = timed(theirs_greedy, compiled)
        row["ours_over_llamagen_eager"] = row["ours_eager_tokens_per_s"] / row["llamagen_eager_tokens_per_s"]
        row["ours_over_llamagen_compiled"] = row["ours_tokens_per_s"] / row["llamagen_compiled_tokens_per_s"]
    return row


# g. Scoring --------------------------------------------------------------------------------------
class VisionTower(nn.Module):
    """CLIP's image tower in shape: patch embedding, class token, pre-norm blocks, projection."""

    def __init__(self, image: int, patch: int, width: int, layers: int, heads: int, embed: int):
        super().__init__()
        self.patch = nn.Conv2d(3, width, patch, patch, bias=False)
        self.cls = nn.Parameter(torch.zeros(1, 1, width))
        self.pos = nn.Parameter(torch.zeros(1, (image // patch) ** 2 + 1, width))
        self.pre = nn.LayerNorm(width)
        layer = nn.TransformerEncoderLayer(width, heads, 4 * width, dropout=0.0, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.post = nn.LayerNorm(width)
        self.proj = nn.Linear(width, embed, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(len(x), -1, -1), x], 1) + self.pos
        return self.proj(self.post(self.blocks(self.pre(x))[:, 0]))


def step_scoring(run: Run, env: Env) -> dict:
    s = env.sizes
    image, patch, width, layers, heads, embed = s["vit"]
    tower = VisionTower(image, patch, width, layers, heads, embed).to(env.device).eval()
    heads_ = [AestheticHead(embed).to(env.device).eval(), NsfwHead(embed).to(env.device).eval()]
    x = torch.randn(s["score_batch"], 3, image, image, device=env.device)

    def score(images):
        with torch.inference_mode(), torch.autocast(env.device.type, dtype=env.autocast,
                                                    enabled=env.autocast is not None):
            e = tower(images).float()
            e = e / e.norm(dim=-1, keepdim=True)
            return [h(e) for h in heads_]

    score(x)
    env.sync()
    times = []
    for _ in range(s["steps"]):
        start = time.perf_counter()
        score(x)
        env.sync()
        times.append(time.perf_counter() - start)
    row = {"tower": f"ViT {image}px patch {patch} width {width} x {layers}", "batch": s["score_batch"],
           "dtype": str(env.dtype), "images_per_s": s["score_batch"] / statistics.median(times)}
    row.update(jpeg_decode(env, image))
    return row


def jpeg_decode(env: Env, size: int) -> dict:
    try:
        import torchvision.io as tvio
    except ImportError:
        return {"jpeg_decode": "not measured: torchvision is not installed"}
    pixels = (torch.rand(3, size, size) * 255).to(torch.uint8)
    data = tvio.encode_jpeg(pixels, quality=90)
    batch = [data] * env.sizes["score_batch"]
    device = "cuda" if env.cuda else "cpu"
    tvio.decode_jpeg(batch, device=device)
    env.sync()
    start = time.perf_counter()
    for _ in range(env.sizes["steps"]):
        tvio.decode_jpeg(batch, device=device)
    env.sync()
    return {"jpeg_decode_device": device,
            "jpeg_decode_images_per_s": len(batch) * env.sizes["steps"] / (time.perf_counter() - start)}


# The run -----------------------------------------------------------------------------------------
# The throughput cases, the longest step, run last: what the budget cuts short is the last of them.
STEPS = [("a_parity", step_parity), ("b_accumulation", step_accumulation), ("c_distributed", step_distributed),
         ("e_loop", step_loop), ("f_sampling", step_sampling), ("g_scoring", step_scoring),
         ("d_throughput", step_throughput)]


def features() -> dict:
    found = {}
    for name, dotted in NEEDS.items():
        module, _, attr = dotted.rpartition(".")
        try:
            found[name] = hasattr(__import__(module, fromlist=[attr]), attr)
        except ImportError:
            found[name] = False
    return found


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="tiny models and shapes: every step on any device")
    parser.add_argument("--out", default="gpu-validate", help="folder for gpu_validate.json")
    parser.add_argument("--budget-s", type=float, default=480.0, help="skip the steps left after this many seconds")
    parser.add_argument("--llamagen-src", default=os.environ.get("LLAMAGEN_SRC") or os.path.join(REPO, "gpu-kit", "llamagen"),
                        help="LlamaGen's model code (a checkout, or the kit's copy)")
    parser.add_argument("--compile-backend", default=None,
                        help="torch.compile backend (default: inductor; aot_eager for --tiny on CPU)")
    parser.add_argument("--only", action="append", choices=[n for n, _ in STEPS], help="run only these steps")
    args = parser.parse_args(argv)
    env = Env(args)
    if env.cuda and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: pass --device cpu --tiny for the smoke run")
    if env.cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    os.makedirs(args.out, exist_ok=True)
    meta = {"device": torch.cuda.get_device_name(env.device) if env.cuda else "cpu", "torch": torch.__version__,
            "python": sys.version.split()[0], "tiny": args.tiny, "compile_backend": env.backend,
            "torch_features": features(), "budget_s": args.budget_s,
            "llamagen": bool(import_llamagen(env.llamagen_src))}
    run = Run(args.out, args.budget_s, meta)
    for name, fn in STEPS:
        if args.only and name not in args.only:
            continue
        run.step(name, fn, env)
    run.data["meta"]["total_s"] = time.monotonic() - (run.deadline - run.budget_s)
    run.write()
    print(f"Wrote {run.path}.")
    return run.data


if __name__ == "__main__":
    main()
