from __future__ import annotations

from typing import Literal

from pydantic import field_validator

from tessera.config.base import Section


class CaptionConfig(Section):
    """Re-captioning of the kept samples with a LLaVA-family model (captions/{shard}.parquet)."""

    enabled: bool = True  # false: kept samples keep their original caption
    # "transformers" (HF LlavaForConditionalGeneration) or "vllm" (needs vLLM installed).
    backend: Literal["transformers", "vllm"] = "transformers"
    # A checkpoint folder or hub id in the HF LLaVA format, or "tiny:llava" for the demo.
    model: str = "llava-hf/llava-1.5-7b-hf"
    # The instruction given with each image.
    prompt: str = "Describe this image in as much detail as possible."
    # The model's input when its processor has no chat template (and always for vLLM).
    prompt_template: str = "USER: <image>\n{prompt} ASSISTANT:"
    max_new_tokens: int = 256
    # Greedy by default; sampling is seeded (the same batches give the same captions).
    do_sample: bool = False
    temperature: float = 1.0  # sampling only
    top_p: float = 1.0  # sampling only
    seed: int = 0
    # Weights on GPU: bf16 or fp32 (CPU always runs fp32).
    precision: Literal["bf16", "fp32"] = "bf16"
    # Output checks: a caption repeating one n-gram over more than this share of it is degenerate.
    repetition_ngram: int = 3
    max_repetition: float = 0.5  # the share for repetition_ngram
    # Images per generate call, model actors, what each actor holds, and attempts per shard beyond
    # the first. num_actors 0 means one per GPU (num_gpus_per_actor > 0) or one per CPU slot.
    batch_size: int = 8
    num_actors: int = 0  # 0: one per GPU, or one per CPU slot
    num_cpus_per_actor: float = 1
    num_gpus_per_actor: float = 0
    shard_retries: int = 2  # attempts per shard beyond the first
    # vLLM only: GPUs per engine (tensor parallel) and its share of GPU memory.
    tensor_parallel_size: int = 1
    gpu_memory_utilization: float = 0.9  # vLLM's share of each GPU's memory

    @field_validator("prompt_template")
    @classmethod
    def _has_slots(cls, v: str) -> str:
        if "{prompt}" not in v or "<image>" not in v:
            raise ValueError("prompt_template needs both {prompt} and <image>")
        return v

    @field_validator("batch_size", "max_new_tokens", "repetition_ngram")
    @classmethod
    def _positive(cls, v: int) -> int:
        if v < 1:
            raise ValueError(f"must be at least 1, got {v}")
        return v
