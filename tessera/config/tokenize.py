from __future__ import annotations

from typing import Literal

from pydantic import field_validator

from tessera.config.base import Resolution, Section


class TokenizeConfig(Section):
    """Pre-tokenization of the kept samples into WebDataset shards of VQ codes, per resolution."""

    # The VQ tokenizer: LlamaGen's vq_ds16_t2i.pt (a path), or "tiny:vq" for the demo.
    vq: str = "tiny:vq"
    # A VQ_CONFIGS name for a bare checkpoint file (a tiny:vq folder carries its own).
    vq_config: str = "VQ-16"
    # Load the checkpoint's "ema" weights instead of "model".
    vq_ema: bool = False
    resolutions: list[Resolution] = [256, 512]  # image sides, multiples of 16 (LlamaGen: 256 and 512)
    # Also store the codes of the horizontally flipped image ({key}.codes_flip.npy).
    flip: bool = False
    # Caption features ({key}.t5.npy, float16, no padding): a T5 checkpoint path or hub id
    # (e.g. google/flan-t5-xl), "tiny:t5", or None to leave them to training.
    text_encoder: str | None = None
    text_max_length: int = 120  # most caption tokens (LlamaGen: 120)
    # Caption cleaning before the text encoder: "llamagen" (LlamaGen's preprocessing, what its
    # checkpoints' features were computed from) or "none" (the caption as it is).
    caption_clean: Literal["none", "llamagen"] = "none"
    # Which caption the features are of; a sample without it falls back to the original caption.
    text_caption: Literal["caption", "caption_long", "caption_short"] = "caption_long"
    # Images per model call, model actors, what each actor holds, and attempts per shard beyond
    # the first.
    batch_size: int = 32
    # VQ model actors.
    num_actors: int = 1
    num_cpus_per_actor: float = 1
    num_gpus_per_actor: float = 0
    shard_retries: int = 2  # attempts per shard beyond the first

    @field_validator("resolutions")
    @classmethod
    def _sorted(cls, v: list[int]) -> list[int]:
        if not v:
            raise ValueError("resolutions must name at least one resolution")
        return sorted(set(v))
