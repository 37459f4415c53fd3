"""The caption encoder: FLAN-T5's encoder (transformers T5EncoderModel), features without padding.

LlamaGen conditions on FLAN-T5-XL encoder features (dim 2048) of at most 120 tokens. We return
each caption's features at its own length (padding is added, left, by whoever batches them).
"""
from __future__ import annotations

import torch

from tessera.models.caption_clean import cleaner
from tessera.models.tiny import caption_corpus, train_tokenizer

MAX_LENGTH = 120
NEIGHBOUR_BIAS = 10.0  # attention logit bias of the tiny encoder's heads towards their neighbour


class TextEncoder:
    def __init__(self, model, tokenizer, max_length: int = MAX_LENGTH, clean: str = "none"):
        self.model = model
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.clean = cleaner(clean)

    @classmethod
    def from_pretrained(cls, name_or_path: str, max_length: int = MAX_LENGTH, device="cpu",
                        dtype=None, clean: str = "none") -> "TextEncoder":
        """A checkpoint folder or hub id (e.g. google/flan-t5-xl); bf16 is the usual dtype on GPU;
        `clean` names the caption cleaning applied before tokenizing ("none" or "llamagen",
        LlamaGen's, which its checkpoints' features were computed after)."""
        from transformers import AutoTokenizer, T5EncoderModel

        tokenizer = AutoTokenizer.from_pretrained(name_or_path)
        model = T5EncoderModel.from_pretrained(name_or_path, dtype=dtype or torch.float32)
        return cls(model.eval().to(device), tokenizer, max_length, clean)

    @property
    def dim(self) -> int:
        return int(self.model.config.d_model)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def encode(self, captions: list[str]) -> list[torch.Tensor]:
        """One float32 tensor [L_i, dim] per caption, 1 <= L_i <= max_length, padding removed."""
        if not captions:
            return []
        batch = self.tokenizer([self.clean(c or "") for c in captions], max_length=self.max_length, truncation=True,
                               padding="longest", return_tensors="pt")
        ids, mask = batch["input_ids"].to(self.device), batch["attention_mask"].to(self.device)
        if ids.shape[1] == 0:  # every caption empty, and a tokenizer that adds nothing
            ids = torch.full((len(captions), 1), self.tokenizer.pad_token_id or 0, device=self.device)
            mask = torch.zeros_like(ids)
        hidden = self.model(input_ids=ids, attention_mask=mask).last_hidden_state.float()
        out = []
        for h, m in zip(hidden, mask.bool()):
            out.append((h[m] if m.any() else h[:1]).cpu())  # either padding side works
        return out


def build_tiny(path: str) -> None:
    """A 2-layer T5 encoder (d_model 32) with a byte-level BPE tokenizer that ends captions with </s>."""
    from tokenizers import processors
    from transformers import T5Config, T5EncoderModel


    torch.manual_seed(0)
    tokenizer = train_tokenizer(caption_corpus(), vocab_size=384, special_tokens=["<pad>", "</s>", "<unk>"],
                                pad_token="<pad>", eos_token="</s>", unk_token="<unk>", padding_side="right")
    eos = tokenizer.convert_tokens_to_ids("</s>")
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="$A </s>", special_tokens=[("</s>", eos)])
    config = T5Config(vocab_size=len(tokenizer), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                      feed_forward_proj="gated-gelu", pad_token_id=tokenizer.pad_token_id, eos_token_id=eos,
                      decoder_start_token_id=tokenizer.pad_token_id)
    model = T5EncoderModel(config)
    # Random attention averages the whole caption into every token, so a colour word's feature
    # would be the same whether it names the shape or the background. Instead two heads look at
    # the token itself and two at its neighbours (offsets 0, 0, -1, +1 through the shared relative
    # position bias): each feature keeps its word and carries its context, as a trained encoder's does.
    attention = model.encoder.block[0].layer[0].SelfAttention
    with torch.no_grad():
        attention.relative_attention_bias.weight.zero_()
        for head, offset in enumerate((0, 0, -1, 1)):
            bucket = attention._relative_position_bucket(
                torch.tensor(offset), bidirectional=True, num_buckets=config.relative_attention_num_buckets,
                max_distance=config.relative_attention_max_distance)
            attention.relative_attention_bias.weight[bucket, head] = NEIGHBOUR_BIAS
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
