"""The Llama generator: a text-conditioned GPT over VQ image codes, LlamaGen's t2i architecture.

A sequence is 120 text positions (caption features through a small MLP, left-padded; fewer for the
tiny demo configs) followed by the image codes in raster order; the model predicts each code from
everything before it.
Parameter names match LlamaGen's released t2i checkpoints, so those load with strict=True.

Pre-norm blocks: RMSNorm (fp32) -> fused qkv attention with 2D RoPE -> RMSNorm -> SwiGLU.
Configurations are data (GPT_CONFIGS); the name of a config is the name of the model.

Attention takes either a dense boolean mask (SDPA; every device, the only one with a CPU backward)
or a FlexAttention block mask (`model.attention = "flex"`; fast when compiled on GPU). Parallelism,
activation checkpointing and compilation are applied to this model from outside (tessera.training).
"""
from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

from tessera.models.chunked_loss import at_least_fp32, chunk_step, chunked_cross_entropy
from tessera.models.gpt_configs import GPT_CONFIGS, TEXT_POSITIONS, GPTConfig, gpt_config

__all__ = ["GPT", "GPT_CONFIGS", "GPTConfig", "TEXT_POSITIONS", "build_gpt", "gpt_config"]


# Building blocks -------------------------------------------------------------------------------
class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return xf.type_as(x) * self.weight


class MLP(nn.Module):
    """The caption projection: caption_dim -> dim -> dim, tanh-GELU, no biases."""

    def __init__(self, in_features: int, hidden: int, out_features: int):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden, bias=False)
        self.fc2 = nn.Linear(hidden, out_features, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class CaptionEmbedder(nn.Module):
    """Caption features -> text prefix; with probability `drop` a caption becomes the uncond one."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.drop = cfg.class_dropout
        # A fixed random "no caption" embedding: a buffer, saved with the weights, never trained.
        self.register_buffer("uncond_embedding",
                             torch.randn(cfg.cls_token_num, cfg.caption_dim) / cfg.caption_dim ** 0.5)
        self.cap_proj = MLP(cfg.caption_dim, cfg.dim, cfg.dim)

    def forward(self, caption: torch.Tensor, drop: torch.Tensor | None = None) -> torch.Tensor:
        if drop is None and self.training and self.drop > 0:
            drop = torch.rand(caption.shape[0], device=caption.device) < self.drop
        if drop is not None:
            caption = torch.where(drop[:, None, None], self.uncond_embedding.to(caption.dtype), caption)
        return self.cap_proj(caption)


class FeedForward(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.w1 = nn.Linear(cfg.dim, cfg.ffn_hidden, bias=False)
        self.w3 = nn.Linear(cfg.dim, cfg.ffn_hidden, bias=False)
        self.w2 = nn.Linear(cfg.ffn_hidden, cfg.dim, bias=False)
        self.dropout = nn.Dropout(cfg.ffn_dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.w2(F.silu(self.w1(x)) * self.w3(x)))


def rope_2d(grid: int, head_dim: int, base: float, text_positions: int,
            text_mode: str, rope_grid: int | None = None) -> torch.Tensor:
    """The rotary table (text_positions + grid*grid, head_dim/2, 2) of (cos, sin).

    Image position (i, j): row frequencies on the first half of the rotary pairs, column
    frequencies on the second; with rope_grid, positions are scaled by rope_grid / grid.
    Text positions: zeros ("llamagen") or no rotation ("identity").
    """
    n_freq = head_dim // 4
    freqs = 1.0 / (base ** (torch.arange(0, head_dim // 2, 2)[:n_freq].float() / (head_dim // 2)))
    positions = torch.arange(grid).float() * ((rope_grid or grid) / grid)
    angles = torch.outer(positions, freqs)  # (grid, n_freq)
    grid_angles = torch.cat([angles[:, None, :].expand(-1, grid, -1),
                             angles[None, :, :].expand(grid, -1, -1)], dim=-1)
    image = torch.stack([grid_angles.cos(), grid_angles.sin()], dim=-1).flatten(0, 1)
    if text_mode == "llamagen":
        text = torch.zeros(text_positions, head_dim // 2, 2)
    elif text_mode == "identity":
        text = torch.stack([torch.ones(text_positions, head_dim // 2),
                            torch.zeros(text_positions, head_dim // 2)], dim=-1)
    else:
        raise ValueError(f"text_rope must be 'llamagen' or 'identity', not {text_mode!r}")
    return torch.cat([text, image])


def apply_rope(x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent pairs of x (B, T, H, D) by table (T, D/2, 2)."""
    xp = x.float().reshape(*x.shape[:-1], -1, 2)
    cos, sin = table[None, :, None, :, 0], table[None, :, None, :, 1]
    out = torch.stack([xp[..., 0] * cos - xp[..., 1] * sin, xp[..., 1] * cos + xp[..., 0] * sin], -1)
    return out.flatten(3).type_as(x)


class KVCache(nn.Module):
    """Keys and values of every position generated so far, for one layer."""

    def __init__(self, batch: int, max_len: int, n_head: int, head_dim: int, dtype, device):
        super().__init__()
        shape = (batch, n_head, max_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, start: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        end = start + k.shape[2]
        self.k[:, :, start:end] = k
        self.v[:, :, start:end] = v
        return self.k[:, :, :end], self.v[:, :, :end]

    def write_at(self, position: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store one position's keys and values at a position held in a tensor; the whole cache."""
        self.k.index_copy_(2, position, k)
        self.v.index_copy_(2, position, v)
        return self.k, self.v


class Attention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.n_head, self.head_dim = cfg.n_head, cfg.head_dim
        self.wqkv = nn.Linear(cfg.dim, 3 * cfg.dim, bias=False)
        self.wo = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.resid_dropout = nn.Dropout(cfg.resid_dropout)
        self.cache: KVCache | None = None

    def forward(self, x: torch.Tensor, rope: torch.Tensor, mask: torch.Tensor | None,
                start: int) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = self.wqkv(x).view(b, t, 3, self.n_head, self.head_dim).unbind(2)
        q, k = apply_rope(q, rope), apply_rope(k, rope)
        q, k, v = (z.transpose(1, 2) for z in (q, k, v))
        if self.cache is not None:
            write = self.cache.write_at if isinstance(start, torch.Tensor) else self.cache.update
            k, v = write(start, k, v)
        if isinstance(mask, BlockMask):
            y = flex_attention(q, k, v, block_mask=mask)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None)
        return self.resid_dropout(self.wo(y.transpose(1, 2).reshape(b, t, -1)))


class TransformerBlock(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attention = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.feed_forward = FeedForward(cfg)

    def forward(self, x, rope, mask, start):
        h = x + self.attention(self.attention_norm(x), rope, mask, start)
        return h + self.feed_forward(self.ffn_norm(h))


# The model ---------------------------------------------------------------------------------------
class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig, grid: int = 16):
        super().__init__()
        self.cfg = cfg
        self.cls_embedding = CaptionEmbedder(cfg)
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.tok_dropout = nn.Dropout(cfg.token_dropout)
        self.layers = nn.ModuleList(TransformerBlock(cfg) for _ in range(cfg.n_layer))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        self.attention: Literal["sdpa", "flex"] = "sdpa"  # how forward() masks: dense or block mask
        self.loss_chunk = 8192  # positions per chunk of the loss (forward with targets)
        self.loss_step = chunk_step  # or a compiled copy (training sets it)
        self.set_grid(grid)
        if not any(p.is_meta for p in self.parameters()):
            self.reset_parameters()

    def set_grid(self, grid: int) -> None:
        """Rebuild the RoPE table for a grid x grid image (never saved: stage 2 grows 16 -> 32)."""
        self.grid = grid
        device = self.tok_embeddings.weight.device
        table = rope_2d(grid, self.cfg.head_dim, self.cfg.rope_base, self.cfg.cls_token_num,
                        self.cfg.text_rope, self.cfg.rope_grid)
        self.register_buffer("rope", table.to(device),
                             persistent=False)

    def reset_parameters(self) -> None:
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=self.cfg.init_std)
        nn.init.zeros_(self.output.weight)

    @property
    def num_image_tokens(self) -> int:
        return self.grid * self.grid

    def num_params(self, embeddings: bool = True) -> int:
        n = sum(p.numel() for p in self.parameters())
        return n if embeddings else n - self.tok_embeddings.weight.numel()

    def _hidden(self, h: torch.Tensor, start: int, mask, keep_from: int = 0) -> torch.Tensor:
        """The blocks over all positions, then the final norm over positions keep_from: only."""
        rope = self.rope[start:start + h.shape[1]]
        for layer in self.layers:
            h = layer(h, rope, mask, start)
        return self.norm(h[:, keep_from:])

    def _blocks(self, h: torch.Tensor, start: int, mask, keep_from: int = 0) -> torch.Tensor:
        """The blocks over all positions, then the head over positions keep_from: only."""
        return at_least_fp32(self.output(self._hidden(h, start, mask, keep_from)))

    @staticmethod
    def attention_mask(cond_mask: torch.Tensor | None, q_pos: torch.Tensor, n_keys: int) -> torch.Tensor | None:
        """Causal mask (B, 1, Tq, Tk) that also hides left-padded text keys (a position always sees itself)."""
        if cond_mask is None:
            return None
        k_pos = torch.arange(n_keys, device=q_pos.device)
        causal = k_pos[None, :] <= q_pos[:, None]
        key_ok = F.pad(cond_mask, (0, max(0, n_keys - cond_mask.shape[1])), value=True)[:, :n_keys]
        mask = causal[None] & key_ok[:, None, :]
        mask |= (k_pos[None, :] == q_pos[:, None])[None]
        return mask[:, None]

    @staticmethod
    def block_mask(cond_mask: torch.Tensor | None, n: int, device: torch.device) -> BlockMask:
        """attention_mask over n positions as a FlexAttention block mask (blocks wholly hidden are skipped)."""
        if cond_mask is None:
            return create_block_mask(lambda b, h, q, kv: kv <= q, None, None, n, n, device=device)
        key_ok = F.pad(cond_mask, (0, max(0, n - cond_mask.shape[1])), value=True)[:, :n]

        def mask_mod(b, h, q, kv):
            return ((kv <= q) & key_ok[b, kv]) | (kv == q)
        return create_block_mask(mask_mod, cond_mask.shape[0], None, n, n, device=device)

    def forward(self, idx: torch.Tensor, cond: torch.Tensor, cond_mask: torch.Tensor | None = None,
                drop_cond: torch.Tensor | None = None, targets: torch.Tensor | None = None,
                target_weight: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (B, 1 + T, vocab) for the image tokens after the prefix and after each of idx (B, T).

        cond: (B, cls_token_num, caption_dim) left-padded caption features; cond_mask: True where real.
        Training passes idx = codes[:, :-1] and scores the logits against all codes. With `targets`
        (B, 1 + T) and `target_weight` (the same shape, each token's weight in the loss) it returns
        sum(target_weight x cross-entropy) instead, in fp32, computed `loss_chunk` positions at a
        time (chunked_loss), so the logits of the whole sequence never exist.
        """
        h = torch.cat([self.cls_embedding(cond, drop_cond), self.tok_embeddings(idx)], dim=1)
        h = self.tok_dropout(h)
        t = h.shape[1]
        if t > self.rope.shape[0]:
            raise ValueError(f"sequence of {t} positions is longer than the {self.grid}x{self.grid} grid allows")
        if self.attention == "flex":
            mask = self.block_mask(cond_mask, t, h.device)
        else:
            mask = self.attention_mask(cond_mask, torch.arange(t, device=h.device), t)
        if targets is None:
            return self._blocks(h, 0, mask, keep_from=self.cfg.cls_token_num - 1)
        hidden = self._hidden(h, 0, mask, keep_from=self.cfg.cls_token_num - 1)
        return chunked_cross_entropy(hidden.flatten(0, 1), self.output.weight, targets.flatten(),
                                     target_weight.flatten(), self.loss_chunk, self.loss_step)

    # Generation with a KV cache ------------------------------------------------------------------
    def setup_cache(self, batch: int, dtype: torch.dtype | None = None) -> None:
        max_len = self.cfg.cls_token_num + self.num_image_tokens
        dtype = dtype or self.tok_embeddings.weight.dtype
        device = self.tok_embeddings.weight.device
        for layer in self.layers:
            layer.attention.cache = KVCache(batch, max_len, self.cfg.n_head, self.cfg.head_dim, dtype, device)

    def clear_cache(self) -> None:
        for layer in self.layers:
            layer.attention.cache = None

    def prefill(self, cond: torch.Tensor, cond_mask: torch.Tensor | None,
                drop_cond: torch.Tensor | None = None) -> torch.Tensor:
        """Run the text prefix into the cache; logits (B, vocab) for the first image token."""
        if cond_mask is None:
            cond_mask = torch.ones(cond.shape[:2], dtype=torch.bool, device=cond.device)
        self._cond_mask = cond_mask
        h = self.cls_embedding(cond, drop_cond)
        mask = self.attention_mask(cond_mask, torch.arange(h.shape[1], device=h.device), h.shape[1])
        return self._blocks(h, 0, mask, keep_from=-1)[:, -1]

    def decode_step_static(self, token: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
        """decode_step over the whole preallocated cache, the position in a one-element tensor:
        every call has the same shapes and no host value, so it compiles once and replays as a
        CUDA graph (`torch.compile(model.decode_step_static, mode="reduce-overhead")`)."""
        h = self.tok_embeddings(token[:, None])
        n_keys = self.layers[0].attention.cache.k.shape[2]
        k_pos = torch.arange(n_keys, device=h.device)
        key_ok = F.pad(self._cond_mask, (0, n_keys - self._cond_mask.shape[1]), value=True)
        mask = ((k_pos <= position) & key_ok) | (k_pos == position)
        rope = self.rope.index_select(0, position)
        for layer in self.layers:
            h = layer(h, rope, mask[:, None, None, :], position)
        return self.output(self.norm(h)).float()[:, -1]

    def decode_step(self, token: torch.Tensor, index: int) -> torch.Tensor:
        """Feed image token number `index` (B,); logits (B, vocab) for the next one."""
        start = self.cfg.cls_token_num + index
        h = self.tok_embeddings(token[:, None])
        mask = self.attention_mask(self._cond_mask, torch.tensor([start], device=h.device), start + 1)
        return self._blocks(h, start, mask)[:, -1]


def build_gpt(name: str, grid: int = 16, device: str | torch.device = "cpu", **overrides) -> GPT:
    with torch.device(device):
        return GPT(gpt_config(name, **overrides), grid=grid)


# Loading checkpoints -------------------------------------------------------------------------------
WEIGHT_KEYS = ("model", "module", "state_dict")
_PREFIXES = ("_orig_mod.", "module.")  # torch.compile and DDP wrappers


def extract_state_dict(obj) -> dict[str, torch.Tensor]:
    """The weights of a LlamaGen-style checkpoint: under `model`, `module` or `state_dict`, or bare."""
    if isinstance(obj, dict):
        for key in WEIGHT_KEYS:
            if key in obj and isinstance(obj[key], dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError("checkpoint holds no state dict under 'model', 'module' or 'state_dict'")
    out = {}
    for name, tensor in obj.items():
        while name.startswith(_PREFIXES):
            name = name.split(".", 1)[1]
        out[name] = tensor
    return out


# LlamaGen's blocks register attention, feed_forward, then the two norms; its optimizer state is
# indexed by that registration order, so an export carrying optimizer state follows it.
_LLAMAGEN_LAYER_ORDER = ("attention.wqkv.weight", "attention.wo.weight", "feed_forward.w1.weight",
                         "feed_forward.w3.weight", "feed_forward.w2.weight", "attention_norm.weight",
                         "ffn_norm.weight")


def llamagen_parameter_order(n_layer: int) -> list[str]:
    """Parameter names in the order LlamaGen's text-to-image GPT's named_parameters() yields them."""
    names = ["cls_embedding.cap_proj.fc1.weight", "cls_embedding.cap_proj.fc2.weight", "tok_embeddings.weight"]
    names += [f"layers.{i}.{n}" for i in range(n_layer) for n in _LLAMAGEN_LAYER_ORDER]
    return names + ["norm.weight", "output.weight"]


def read_checkpoint(path: str) -> dict:
    """torch.load a checkpoint (local or fsspec URL) safely: tensors and plain containers only,
    plus argparse.Namespace (training scripts often save their `args` beside the weights)."""
    import argparse

    import fsspec

    with torch.serialization.safe_globals([argparse.Namespace]):
        if "://" not in path or path.startswith("file://"):
            # Memory-mapped: tensors are read when used, so a look at a large file's config is cheap.
            try:
                return torch.load(path.removeprefix("file://"), map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as e:  # the legacy (pre-zip) format cannot be mapped
                if "mmap" not in str(e):
                    raise
        with fsspec.open(path, "rb") as f:
            return torch.load(f, map_location="cpu", weights_only=True)


def load_weights(model: GPT, path_or_state) -> GPT:
    """Load weights strictly (no missing or unexpected names) from a path or a loaded checkpoint."""
    obj = read_checkpoint(path_or_state) if isinstance(path_or_state, str) else path_or_state
    state = extract_state_dict(obj)
    # A model built on the meta device takes the checkpoint's tensors as its own.
    model.load_state_dict(state, strict=True, assign=any(p.is_meta for p in model.parameters()))
    return model


def train_flops_per_sample(cfg: GPTConfig, n_image: int) -> float:
    """Model FLOPs of one training sample, forward and backward, over every position the step runs.

    The step runs T = text + n_image - 1 positions (the text prefix, then the codes but the last).
    A matmul costs 2 FLOPs per multiply-add forward and twice that backward (input and weight
    gradients): 6 per weight and position. Per layer: the qkv, output and three SwiGLU weights,
    4d^2 + 3dh, over T positions; attention's scores and weighted values, 4 T^2 d forward and
    8 T^2 d backward (the whole square, as PaLM counts it: the causal half is not subtracted).
    The caption MLP runs over the text positions only, and its first layer needs no input gradient
    (the caption features are data): 4 per weight. The output head runs over the n_image image
    positions only. Recomputation by activation checkpointing is not counted (model FLOPs)."""
    d, text = cfg.dim, cfg.cls_token_num
    t = text + n_image - 1
    blocks = 6 * cfg.n_layer * (4 * d * d + 3 * d * cfg.ffn_hidden) * t
    attention = 12 * cfg.n_layer * d * t * t
    caption = (4 * cfg.caption_dim * d + 6 * d * d) * text
    head = 6 * d * cfg.vocab_size * n_image
    return float(blocks + attention + caption + head)


def mfu(cfg: GPTConfig, n_image: int, samples_per_s: float, peak_flops: float) -> float:
    """Model FLOPs utilisation: the FLOPs of the samples trained per second over the peak FLOPs."""
    return train_flops_per_sample(cfg, n_image) * samples_per_s / peak_flops if peak_flops else math.nan
