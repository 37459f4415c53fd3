"""The generator's configurations by name (GPT-B ... GPT-3B and the tiny ones), without torch, so
that a config's model names are checked in a moment (tessera.preflight)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

TEXT_POSITIONS = 120  # the text prefix: FLAN-T5 features, at most 120 tokens, left-padded


@dataclass(frozen=True)
class GPTConfig:
    dim: int
    n_layer: int
    n_head: int
    vocab_size: int = 16384
    caption_dim: int = 2048
    cls_token_num: int = TEXT_POSITIONS
    multiple_of: int = 256  # SwiGLU hidden size is rounded up to this
    norm_eps: float = 1e-5
    rope_base: float = 10000.0
    # The grid the 2D rotary positions span (None: the image's own grid). A model fine-tuned on a
    # larger grid than it was trained on can keep its first grid: the new rows and columns then
    # fall between the old ones (position interpolation), and what it learnt of where things go
    # carries over instead of being relearnt.
    rope_grid: int | None = None
    # How the text positions are rotated. "llamagen": an all-zero table, which zeroes text queries
    # and keys (LlamaGen issue #54); it is what the released checkpoints were trained with.
    # "identity": no rotation, so text keys keep their content. Identity is the default for new
    # training because it is the fix; sampling a LlamaGen checkpoint must use "llamagen".
    text_rope: Literal["identity", "llamagen"] = "identity"
    token_dropout: float = 0.1
    resid_dropout: float = 0.1
    ffn_dropout: float = 0.1
    class_dropout: float = 0.1  # CFG: probability that a caption is replaced by the uncond embedding
    init_std: float = 0.02

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_head

    @property
    def ffn_hidden(self) -> int:
        hidden = int(2 * (4 * self.dim) / 3)
        return -(-hidden // self.multiple_of) * self.multiple_of

    def replace(self, **changes) -> "GPTConfig":
        return dataclasses.replace(self, **changes)


GPT_CONFIGS: dict[str, GPTConfig] = {
    "GPT-B": GPTConfig(dim=768, n_layer=12, n_head=12),
    "GPT-L": GPTConfig(dim=1024, n_layer=24, n_head=16),
    "GPT-XL": GPTConfig(dim=1280, n_layer=36, n_head=20),
    "GPT-XXL": GPTConfig(dim=1536, n_layer=48, n_head=24),
    "GPT-3B": GPTConfig(dim=3200, n_layer=24, n_head=32),
    # Tiny ones for tests and the CPU demo.
    "GPT-nano": GPTConfig(dim=32, n_layer=2, n_head=2, vocab_size=256, caption_dim=32, multiple_of=32),
    "GPT-tiny": GPTConfig(dim=64, n_layer=4, n_head=4, vocab_size=1024, caption_dim=64, multiple_of=64),
    # The CPU demo's: its captions are about a dozen tokens, so a 24-position text prefix (not 120)
    # leaves most of every sequence to the image; two layers learn the captions' colours as fast per
    # image as four, at twice the images per second.
    "GPT-demo": GPTConfig(dim=64, n_layer=2, n_head=4, vocab_size=512, caption_dim=32, multiple_of=64,
                          cls_token_num=24),
}


def gpt_config(name: str, **overrides) -> GPTConfig:
    if name not in GPT_CONFIGS:
        raise ValueError(f"unknown GPT config {name!r}; known: {', '.join(GPT_CONFIGS)}")
    return GPT_CONFIGS[name].replace(**{k: v for k, v in overrides.items() if v is not None})
