"""The worker's place in the job, and what turns a one-device GPT into a training model.

Order, as torchtitan applies it: activation checkpointing per block, then compile per block,
then FSDP2 (`fully_shard` per block, then the root) or DDP.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from functools import partial

import torch
import torch.distributed as dist

from tessera.config.train import TrainConfig
from tessera.models.chunked_loss import chunk_step
from tessera.models.gpt import GPT


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")
    in_ray: bool = False


def dist_context(use_ray: bool, use_gpu: bool) -> Dist:
    """This worker's rank, world and device: from Ray Train, from a process group already set up,
    or from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR), whose process
    group is set up here; otherwise one worker alone."""
    if use_ray:
        import ray.train
        import ray.train.torch

        ctx = ray.train.get_context()
        return Dist(ctx.get_world_rank(), ctx.get_world_size(), ray.train.torch.get_device(), True)
    cuda = use_gpu and torch.cuda.is_available()
    if "WORLD_SIZE" in os.environ and "RANK" in os.environ and not dist.is_initialized():
        init_process_group(cuda, int(os.environ.get("LOCAL_RANK", 0)))
    if dist.is_available() and dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
        local = int(os.environ.get("LOCAL_RANK", rank))
        return Dist(rank, world, torch.device(f"cuda:{local}" if cuda else "cpu"))
    return Dist(device=torch.device("cuda" if cuda else "cpu"))


def init_process_group(cuda: bool, local_rank: int = 0) -> None:
    """The default process group from the environment (env://): NCCL for CUDA tensors beside gloo
    for CPU ones (asynchronous checkpoints and CPU collectives need the latter), gloo alone on CPU."""
    if cuda:
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend=PROCESS_GROUP_BACKEND if cuda else "gloo")


PROCESS_GROUP_BACKEND = "cpu:gloo,cuda:nccl"


def mean_over_workers(value: torch.Tensor, d: Dist) -> torch.Tensor:
    if d.world > 1:
        value = value.detach().clone()
        dist.all_reduce(value)
        value /= d.world
    return value


# Activation checkpointing -------------------------------------------------------------------------
# Selective: keep the outputs of the matmuls and of attention (SDPA's kernels and FlexAttention's
# operator), recompute the cheap element-wise work (norms, RoPE, SiLU, dropout) in the backward pass.
_SAVE = {torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default,
         torch.ops.aten._scaled_dot_product_flash_attention.default,
         torch.ops.aten._scaled_dot_product_efficient_attention.default,
         torch.ops.aten._scaled_dot_product_cudnn_attention.default,
         torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default,
         torch.ops.higher_order.flex_attention}


def _selective_policy(ctx, op, *args, **kwargs):
    from torch.utils.checkpoint import CheckpointPolicy

    return CheckpointPolicy.MUST_SAVE if op in _SAVE else CheckpointPolicy.PREFER_RECOMPUTE


def apply_activation_checkpointing(model: GPT, mode: str) -> None:
    """Wrap every block: "full" keeps only the block's input, "selective" the matmul outputs too."""
    if mode == "off":
        return
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    if mode == "full":
        wrap = partial(checkpoint_wrapper, preserve_rng_state=True)
    elif mode == "selective":
        from torch.utils.checkpoint import create_selective_checkpoint_contexts

        wrap = partial(checkpoint_wrapper, preserve_rng_state=True,
                       context_fn=partial(create_selective_checkpoint_contexts, _selective_policy))
    else:
        raise ValueError(f"activation_checkpointing must be off, full or selective, not {mode!r}")
    for i, block in enumerate(model.layers):
        model.layers[i] = wrap(block)


def parallelize(model: GPT, cfg: TrainConfig, d: Dist, compile_backend: str = "inductor") -> torch.nn.Module:
    """Activation checkpointing, compile, then FSDP2 or DDP; returns the module to train."""
    if cfg.attention == "flex" and d.device.type != "cuda":
        raise ValueError("attention: flex trains on GPU only (FlexAttention has no CPU backward); "
                         "use attention: sdpa or auto here")
    # FlexAttention is fast only compiled (eager, it materialises every score): auto picks it then.
    flex = cfg.attention == "flex" or (cfg.attention == "auto" and d.device.type == "cuda" and cfg.compile)
    model.attention = "flex" if flex else "sdpa"
    apply_activation_checkpointing(model, cfg.activation_checkpointing)
    model.loss_chunk = cfg.loss_chunk
    if cfg.compile:
        for i, block in enumerate(model.layers):
            model.layers[i] = torch.compile(block, backend=compile_backend)
        model.loss_step = torch.compile(chunk_step, backend=compile_backend, dynamic=False)
    if d.world > 1 and cfg.parallel == "fsdp":
        apply_fsdp(model, bf16=d.device.type == "cuda" and cfg.bf16)
    elif d.world > 1:
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model, device_ids=[d.device.index] if d.device.type == "cuda" else None)
    return model


def apply_fsdp(model: GPT, bf16: bool) -> None:
    """FSDP2: `fully_shard` every block, then the root; bf16 weights in compute, fp32 reductions."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else MixedPrecisionPolicy()
    for block in model.layers:
        fully_shard(block, mp_policy=mp)
    fully_shard(model, mp_policy=mp)
