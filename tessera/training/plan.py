"""The memory plan of a training stage: per-GPU bytes and tokens per step, before anything runs.

Every term is counted from what the step keeps alive, per block and per token:

- weights fp32 (4 B/param), gradients fp32 (4), AdamW moments (8); FSDP2 divides them by the
  number of workers and adds the all-gathered bf16 weights of two blocks; DDP adds its gradient
  buckets (4 B/param) and autocast its bf16 weight copies (2 B/param).
- activations per block and token, without checkpointing (a = 2 B under bf16, 4 B in fp32):
  two RMSNorms keep their fp32 input, the normalised product and the output (4d + 2ad each),
  the qkv projection (3ad, kept by the value view), rotated q and k (2ad), the attention output
  and its log-sum-exp (ad + 4H), the FFN's w1, SiLU, w3 and product (4ah), two dropout masks
  (2d). Full checkpointing keeps the block input (ad) and recomputes one block at a time;
  selective keeps the matmul and attention outputs (a(6d + 2h) + 4H) plus the block input.
  The backward pass of one block holds gradients about as large as that block's activations.
- the output head and loss over image positions only, `loss_chunk` positions at a time: that
  chunk's fp32 logits and their softmax (two fp32 copies of chunk x vocabulary), plus the head
  weight's gradient kept in fp32 for the backward pass (the hidden states' gradient, kept too,
  takes the place of the hidden states the head would otherwise keep).
- the text encoder in bf16 on each GPU when captions are encoded during training.

`measure_cpu_peak` runs one model on CPU (fp32) and reads the process's peak resident memory, so
the estimate of the same model is checked against what was really allocated.
"""
from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import asdict, dataclass

from tessera.config.train import TrainConfig
from tessera.models.gpt import GPT, GPTConfig, gpt_config, train_flops_per_sample

GiB = 2**30
# Encoder parameters of the text encoders the configs name (bf16 on GPU: 2 B each).
TEXT_ENCODER_PARAMS = {"flan-t5-xl": 1.22e9, "t5-v1_1-xl": 1.22e9, "flan-t5-xxl": 4.76e9, "t5-v1_1-xxl": 4.76e9}


@dataclass
class MemoryPlan:
    model: str
    resolution: int
    workers: int
    parallel: str
    micro_batch: int
    activation_checkpointing: str
    params: int
    tokens_per_step: int  # image tokens (the loss's) per optimizer step, all workers
    positions: int  # sequence length: text prefix + image tokens
    weights: float  # bytes per GPU
    gradients: float
    optimizer: float
    comm_buffers: float
    activations: float
    logits: float
    text_encoder: float
    flops_per_step: float  # training FLOPs per optimizer step, all workers

    @property
    def total(self) -> float:
        return (self.weights + self.gradients + self.optimizer + self.comm_buffers + self.activations
                + self.logits + self.text_encoder)

    def table(self) -> str:
        rows = [("weights (fp32)", self.weights), ("gradients (fp32)", self.gradients),
                ("AdamW moments", self.optimizer), ("DDP buckets, bf16 weight copies / FSDP2 blocks", self.comm_buffers),
                (f"activations (checkpointing {self.activation_checkpointing})", self.activations),
                ("logits and loss (one chunk)", self.logits), ("text encoder (bf16)", self.text_encoder),
                ("total per GPU", self.total)]
        return "\n".join(f"  {name:44s} {value / GiB:8.2f} GiB" for name, value in rows)


def block_activation_bytes(cfg: GPTConfig, a: int, mode: str, r: int | None = None) -> float:
    """Bytes one block keeps per token for the backward pass (see the module docstring).

    a: bytes of the matmul outputs (2 under bf16); r: of the residual stream (4 with fp32
    weights under autocast, 2 with FSDP2's bf16 weights; default a)."""
    d, h, heads = cfg.dim, cfg.ffn_hidden, cfg.n_head
    r = r or a
    if mode == "full":
        return r * d
    if mode == "selective":
        return r * d + a * (6 * d + 2 * h) + 4 * heads
    # Each norm: its fp32 input, the normalised product and the output (and their bf16 cast for the
    # next matmul when the residual stream is fp32 and matmuls run in bf16).
    norms = 2 * (4 * d + 2 * r * d + (a * d if a != r else 0))
    attention = a * (3 * d + 2 * d + d) + 4 * heads
    ffn = 4 * a * h
    masks = 2 * d  # dropout masks, one byte per element
    return norms + attention + ffn + masks


def estimate(cfg: GPTConfig, *, resolution: int, micro_batch: int, workers: int = 1, parallel: str = "ddp",
             checkpointing: str = "off", bf16: bool = True, text_encoder: str | None = None,
             global_batch: int | None = None, model: str = "", loss_chunk: int = 8192) -> MemoryPlan:
    grid = resolution // 16
    n_image = grid * grid
    positions = cfg.cls_token_num + n_image
    params = sum(p.numel() for p in build_gpt_meta(cfg, grid).parameters())
    block_params = 4 * cfg.dim * cfg.dim + 3 * cfg.dim * cfg.ffn_hidden + 2 * cfg.dim
    shard = workers if parallel == "fsdp" else 1
    a = 2 if bf16 else 4
    r = 2 if bf16 and parallel == "fsdp" and workers > 1 else 4
    weights, gradients, optimizer = 4 * params / shard, 4 * params / shard, 8 * params / shard
    if parallel == "fsdp" and workers > 1:
        comm = 2 * 2 * block_params + 4 * block_params  # two gathered bf16 blocks, one block's fp32 grads
    else:
        comm = 4 * params if workers > 1 else 0.0  # DDP's gradient buckets
        comm += 2 * params if bf16 else 0.0  # autocast's bf16 copies of the weights, kept for the step
    per_block = block_activation_bytes(cfg, a, checkpointing, r)
    tokens = micro_batch * positions
    activations = cfg.n_layer * per_block * tokens
    # The backward pass of a block holds gradients about as large as its activations; with
    # checkpointing, the block being recomputed holds its full activations too.
    activations += block_activation_bytes(cfg, a, "off", r) * tokens * (1 if checkpointing == "off" else 2)
    # Caption projection (fp32 features in, two hidden states) and the final norm (image positions).
    activations += micro_batch * cfg.cls_token_num * (4 * cfg.caption_dim + 2 * a * cfg.dim)
    activations += micro_batch * n_image * (4 * cfg.dim + 2 * r * cfg.dim + (a * cfg.dim if a != r else 0))
    chunk = min(loss_chunk, micro_batch * n_image)
    logits = 2 * 4 * chunk * cfg.vocab_size + 4 * cfg.vocab_size * cfg.dim
    encoder = 0.0
    if text_encoder:
        encoder = 2 * next((n for k, n in TEXT_ENCODER_PARAMS.items() if k in text_encoder), 0.0)
    step_batch = global_batch or micro_batch * workers
    return MemoryPlan(model=model, resolution=resolution, workers=workers, parallel=parallel,
                      micro_batch=micro_batch, activation_checkpointing=checkpointing, params=params,
                      tokens_per_step=step_batch * n_image, positions=positions, weights=weights,
                      gradients=gradients, optimizer=optimizer, comm_buffers=comm, activations=activations,
                      logits=logits, text_encoder=encoder,
                      flops_per_step=train_flops_per_sample(cfg, n_image) * step_batch)


def build_gpt_meta(cfg: GPTConfig, grid: int):
    import torch


    with torch.device("meta"):
        return GPT(cfg, grid=grid)


def plan_stage(tcfg: TrainConfig, *, checkpointing: str | None = None, micro_batch: int | None = None,
               caption_dim: int = 2048) -> MemoryPlan:
    """The plan of a stage as configured (GPU, bf16), optionally with another checkpointing mode or micro-batch."""
    cfg = gpt_config(tcfg.model, vocab_size=tcfg.vocab_size, caption_dim=tcfg.caption_dim or caption_dim)
    workers = tcfg.num_workers
    return estimate(cfg, resolution=tcfg.data.resolution, micro_batch=micro_batch or tcfg.micro_batch_for(workers),
                    workers=workers, parallel=tcfg.parallel,
                    checkpointing=checkpointing or tcfg.activation_checkpointing, bf16=tcfg.bf16,
                    text_encoder=tcfg.text_encoder, global_batch=tcfg.global_batch, model=tcfg.model,
                    loss_chunk=tcfg.loss_chunk)


HEADROOM = 0.9  # of the GPU's memory a plan may fill: the CUDA context and fragmentation take the rest


def declared_fit(tcfg: TrainConfig, caption_dim: int = 2048) -> tuple[MemoryPlan, float]:
    """The plan of a GPU stage and the bytes it may use: HEADROOM of its declared gpu_memory_gib."""
    if tcfg.gpu_memory_gib is None:
        raise ValueError(f"the {tcfg.model} stage trains on GPU but declares no gpu_memory_gib to plan it for")
    return plan_stage(tcfg, caption_dim=caption_dim), HEADROOM * tcfg.gpu_memory_gib * GiB


def largest_micro_batch(tcfg: TrainConfig, gpu_bytes: float, checkpointing: str, headroom: float = HEADROOM,
                        caption_dim: int = 2048) -> int:
    """The largest micro-batch (dividing each worker's share) whose plan fits headroom x gpu_bytes; 0: none."""
    share = tcfg.global_batch // tcfg.num_workers
    best = 0
    for mb in range(1, share + 1):
        if share % mb == 0 and plan_stage(tcfg, checkpointing=checkpointing, micro_batch=mb,
                                          caption_dim=caption_dim).total <= headroom * gpu_bytes:
            best = mb
    return best


def report(tcfg: TrainConfig, stage: str, gpu_gb: float, caption_dim: int = 2048) -> str:
    lines = [f"{stage}: {tcfg.model} at {tcfg.data.resolution}px, global batch {tcfg.global_batch} on "
             f"{tcfg.num_workers} GPU(s), {tcfg.parallel}, bf16 {tcfg.bf16}"]
    current = plan_stage(tcfg, caption_dim=caption_dim)
    fits = current.total <= HEADROOM * gpu_gb * GiB
    lines.append(f"as configured (micro-batch {current.micro_batch}, checkpointing "
                 f"{tcfg.activation_checkpointing}): {current.total / GiB:.1f} GiB per GPU, "
                 f"{'fits' if fits else 'does NOT fit'} {HEADROOM:.0%} of {gpu_gb:g} GiB")
    lines.append(f"{current.params / 1e6:.0f}M parameters, {current.positions} positions per sample, "
                 f"{current.tokens_per_step:,} image tokens per step, "
                 f"{current.flops_per_step / 1e15:.1f} PFLOP per step")
    for mode in ("off", "selective", "full"):
        p = plan_stage(tcfg, checkpointing=mode, caption_dim=caption_dim)
        fits = largest_micro_batch(tcfg, gpu_gb * GiB, mode, caption_dim=caption_dim)
        lines.append(f"\nactivation checkpointing {mode}, micro-batch {p.micro_batch}:")
        lines.append(p.table())
        lines.append(f"  largest micro-batch within {HEADROOM:.0%} of {gpu_gb:g} GiB: {fits or 'none fits'}"
                     + (f" (gradient accumulation {tcfg.global_batch // tcfg.num_workers // fits})" if fits else ""))
    return "\n".join(lines)


# The CPU check ----------------------------------------------------------------------------------
_MEASURE = r"""
import json, sys, torch
torch.set_num_threads(1)
from tessera.models.gpt import GPT, GPTConfig
from tessera.config.train import TrainConfig
from tessera.training.parallel import apply_activation_checkpointing
from tessera.training.step import build_optimizer, train_step

def rss(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) * 1024

a = json.loads(sys.argv[1])
cfg, grid, mb = GPTConfig(**a["cfg"]), a["resolution"] // 16, a["micro_batch"]
g = torch.Generator().manual_seed(0)
batch = {"codes": torch.randint(0, cfg.vocab_size, (mb, grid * grid), generator=g),
         "cond": torch.randn(mb, cfg.cls_token_num, cfg.caption_dim, generator=g),
         "cond_mask": torch.ones(mb, cfg.cls_token_num, dtype=torch.bool), "valid": torch.ones(mb, dtype=torch.bool)}
batch["cond_mask"][:, :cfg.cls_token_num // 2] = False

def steps(cfg, batch, n):
    model = GPT(cfg, grid=grid)
    apply_activation_checkpointing(model, a["checkpointing"])
    opt = build_optimizer(model, TrainConfig(global_batch=len(batch["codes"])), torch.device("cpu"))
    for _ in range(n):
        train_step(model, opt, [batch])

# A tiny model first: the library code and kernels that a step pages in are not the step's memory.
steps(cfg.replace(dim=32, n_head=2, n_layer=1, multiple_of=32, vocab_size=64, caption_dim=cfg.caption_dim),
      {**batch, "codes": batch["codes"][:1] % 64, "cond": batch["cond"][:1], "cond_mask": batch["cond_mask"][:1],
       "valid": batch["valid"][:1]}, 2)
open("/proc/self/clear_refs", "w").write("5")
base = rss("VmRSS")
steps(cfg, batch, 2)
print(json.dumps({"peak": rss("VmHWM") - base}))
"""


def measure_cpu_peak(cfg: GPTConfig, resolution: int, micro_batch: int, checkpointing: str = "off") -> float:
    """Peak resident bytes of two fp32 training steps on CPU in a fresh process, above its baseline."""
    arg = json.dumps({"cfg": asdict(cfg), "resolution": resolution, "micro_batch": micro_batch,
                      "checkpointing": checkpointing})
    out = subprocess.run([sys.executable, "-c", _MEASURE, arg], capture_output=True, text=True, check=True)
    return float(json.loads(out.stdout.strip().splitlines()[-1])["peak"])
