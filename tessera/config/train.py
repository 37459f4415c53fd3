"""Config of the two training stages (`stage1`, `stage2`) and of sampling (`sample`)."""
from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from tessera.config.base import Resolution, Section


class CodesDataConfig(Section):
    """The training stream over tokens/{resolution} shards."""

    resolution: Resolution = 256  # which tokens/{resolution} shards to read
    # Caption features: "stored" uses {key}.t5.npy (error when absent), "encode" runs the text
    # encoder on the caption, "auto" uses stored features when the sample has them and the chosen
    # caption is the one they were computed from, and encodes otherwise.
    text: Literal["auto", "stored", "encode"] = "auto"
    # Which caption a sample is trained with: the re-caption (caption_long) when present, else
    # the original; with short_caption_prob, caption_short takes its place (LlamaGen stage 2: 0.3).
    caption: Literal["caption", "caption_long"] = "caption_long"
    short_caption_prob: float = 0.0  # probability of caption_short instead
    # Probability of training on the flipped codes ({key}.codes_flip.npy) when a sample has them.
    flip_prob: float = 0.0
    # Share of a sample's input codes replaced by random codes; the targets stay the true codes.
    # Teacher forcing never shows the model a wrong code, so at sampling time one badly drawn code
    # is copied onwards; with noise in its inputs the model learns to fall back on the caption.
    code_noise: float = Field(0.0, ge=0.0, lt=1.0)
    seed: int = 0  # the data order and every per-step random draw
    # Threads that read one worker's samples of a batch at once. None: 1 on a local filesystem
    # (its reads are quick; more threads only compete with training for the interpreter), 8 on an object
    # store (each ranged read waits tens of milliseconds; 64 samples per batch need overlapping).
    read_threads: int | None = Field(None, ge=1)


class OptimConfig(Section):
    """AdamW with LlamaGen's defaults."""

    lr_per_256: float = 1e-4  # learning rate per 256 images of global batch
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.05  # on parameters of 2 or more dims only
    grad_clip: float = 1.0
    # Constant, or cosine decay to min_lr_ratio after the warmup.
    schedule: Literal["constant", "cosine"] = "constant"
    warmup_steps: int = 0
    min_lr_ratio: float = 0.1  # the cosine schedule ends at this fraction of the peak


class TrainConfig(Section):
    model: str = "GPT-XL"  # a name in tessera.models.gpt.GPT_CONFIGS
    # Overrides of the model config (None: the config's value).
    vocab_size: int | None = None
    caption_dim: int | None = None  # None: the text encoder's dim, or the stored features' dim
    # How text positions are rotated (GPTConfig.text_rope): identity (not rotated) or llamagen
    # (LlamaGen's all-zero table). None: what the starting weights were trained with (this stage's
    # own checkpoint, else init_from; LlamaGen's released checkpoints are "llamagen"), and
    # "identity" for a model trained from scratch. A value that contradicts the starting weights
    # is refused unless identity_override is set.
    text_rope: Literal["identity", "llamagen"] | None = None
    # The grid the rotary positions span (GPTConfig.rope_grid); in a fine-tune at a higher
    # resolution, the earlier stage's grid (resolution / 16) keeps what it learnt of places.
    # None: the starting weights' setting (their own grid's positions extended: LlamaGen's way).
    rope_grid: int | None = Field(None, gt=0)
    # Train with text_rope / rope_grid as set even when the starting weights were trained with
    # others (the model then starts from a different function than the one its weights learnt).
    identity_override: bool = False
    dropout: float | None = None  # token, residual and FFN dropout together
    class_dropout: float | None = None  # CFG training: probability a caption becomes the uncond one
    # Start from these weights only (fresh optimizer and step): "stage1" (the newest checkpoint of
    # this run's stage 1), "RUN/stage1" (another run's, under the same runs_root), or a checkpoint
    # path, LlamaGen's included. Ignored once this stage has a checkpoint of its own (resume).
    init_from: str | None = None
    text_encoder: str | None = None  # path, hub id or tiny:NAME; needed unless every sample has stored features
    # Caption cleaning before the text encoder: "llamagen" (LlamaGen's preprocessing, what its
    # checkpoints' features were computed from) or "none" (the caption as it is).
    caption_clean: Literal["none", "llamagen"] = "none"
    vq: str | None = None  # for sample grids during training
    data: CodesDataConfig = CodesDataConfig()
    optim: OptimConfig = OptimConfig()
    global_batch: int = 256  # samples per optimizer step, over all workers
    micro_batch: int | None = None  # per worker and forward pass; None: global_batch / workers
    max_steps: int = 1000
    # Ray Train.
    num_workers: int = 1
    use_gpu: bool = False  # one GPU per worker
    # GPU memory per worker this stage is planned for (GiB, e.g. 80 for an 80 GB H100); `tessera
    # plan` and the tests check that the plan of the stage fits 90% of it. None: not planned (CPU).
    gpu_memory_gib: float | None = Field(None, gt=0)
    parallel: Literal["ddp", "fsdp"] = "ddp"  # fsdp: FSDP2 (fully_shard) per block, for the large configs
    use_ray: bool = True  # False: train in this process without Ray (one worker)
    # Torch threads per worker on CPU; None: torch's default (Ray sets one thread per CPU it grants).
    threads: int | None = None
    bf16: bool = True  # autocast to bf16 on GPU (CPU runs in fp32); the text encoder runs in bf16 on GPU
    compile: bool = False  # torch.compile each block, and the loss's chunk step
    # Positions of the micro-batch whose logits the loss computes at once (its fp32 logits take
    # loss_chunk x vocab x 4 bytes, 0.5 GiB at 8192 x 16384); the whole sequence's never exist.
    loss_chunk: int = Field(8192, ge=1)
    # Activation checkpointing per block: off, full (recompute the block) or selective (keep the
    # matmul and attention outputs, recompute the element-wise work).
    activation_checkpointing: Literal["off", "full", "selective"] = "off"
    # Attention masking: sdpa (a dense mask; every device), flex (a FlexAttention block mask; GPU
    # only for training, as FlexAttention has no CPU backward), auto (flex on GPU when compiled,
    # else sdpa).
    attention: Literal["auto", "sdpa", "flex"] = "auto"
    # Checkpoints, metrics, sample grids.
    checkpoint_every: int = 500
    keep_checkpoints: int = 3  # the newest this many are kept
    async_checkpoint: bool = False  # save in a background thread while training goes on
    log_every: int = 10  # steps between metric lines
    tensorboard: bool = True  # TensorBoard events beside metrics.jsonl
    sample_every: int = 0  # 0: never during training
    # Prompts of the grids drawn every sample_every steps.
    sample_prompts: list[str] = ["a red circle on a blue background", "a green square in the center"]
    peak_tflops: float | None = None  # per GPU, for MFU; None: known for A100/H100/H200, else no MFU

    @model_validator(mode="after")
    def _batches(self):
        per_step = (self.micro_batch or 1) * self.num_workers
        if self.micro_batch and self.global_batch % per_step:
            raise ValueError(f"global_batch {self.global_batch} is not a multiple of "
                             f"micro_batch x num_workers = {per_step}")
        if self.global_batch % self.num_workers:
            raise ValueError(f"global_batch {self.global_batch} is not a multiple of num_workers {self.num_workers}")
        return self

    def micro_batch_for(self, world: int) -> int:
        """Samples per forward pass on each of `world` workers (every step is global_batch samples)."""
        share = self.global_batch // world
        micro = min(self.micro_batch or share, share)
        if share % micro:
            raise ValueError(f"each of {world} workers takes {share} samples per step, which micro_batch "
                             f"{micro} does not divide")
        return micro

    @property
    def grad_accum(self) -> int:
        return self.global_batch // ((self.micro_batch or self.global_batch // self.num_workers) * self.num_workers)


class SampleConfig(Section):
    # A checkpoint path (ours or LlamaGen's); None: the latest of this run's stage 2, else stage 1.
    checkpoint: str | None = None
    # For checkpoints that do not carry their config (LlamaGen's): the model and its text RoPE.
    model: str = "GPT-XL"
    text_rope: Literal["identity", "llamagen"] = "llamagen"
    resolution: Resolution | None = None  # None: the checkpoint's training resolution, else 256
    vq: str = "vq_ds16_t2i.pt"  # decodes the codes (a relative path is under models_root)
    text_encoder: str = "google/flan-t5-xl"  # path, hub id or tiny:NAME
    # Caption cleaning before the text encoder: "llamagen" (LlamaGen's preprocessing, what its
    # checkpoints' features were computed from) or "none" (the caption as it is).
    caption_clean: Literal["none", "llamagen"] = "none"
    prompts: list[str] = ["a red circle on a blue background"]
    images_per_prompt: int = 1
    batch_size: int = 8
    cfg_scale: float = 7.5  # classifier-free guidance scale
    temperature: float = 1.0  # 0: greedy
    top_k: int = 1000  # 0: off
    top_p: float = 1.0
    # Sample with the KV cache.
    use_cache: bool = True
    seed: int = 0
    device: str = "cpu"  # cpu or cuda
