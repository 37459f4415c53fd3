"""Tiny models for the demo and the tests, built offline in the real checkpoint formats
(see tessera.models.refs for how a `tiny:NAME` reference is built and found)."""
from __future__ import annotations

import os
import shutil

WORLD_WEIGHTS = os.path.join(os.path.dirname(__file__), "world_weights")


def install_world(name: str, path: str) -> None:
    """Copy the shipped world-trained model `name` to `path`."""
    source = os.path.join(WORLD_WEIGHTS, name)
    if not os.path.isdir(source):
        raise FileNotFoundError(f"{source}: the world-trained {name} is missing; train it with "
                                f"`python -m tessera.demo.world_models`")
    shutil.copytree(source, path)


def install_world_clip(path: str) -> None:
    install_world("clip", path)


def install_world_aesthetic(path: str) -> None:
    install_world("aesthetic", path)


def install_world_watermark(path: str) -> None:
    install_world("watermark", path)


def install_world_llava(path: str) -> None:
    install_world("llava", path)


def train_tokenizer(corpus: list[str], vocab_size: int = 512, special_tokens: list[str] | None = None,
                    **fast_kwargs):
    """A small byte-level BPE tokenizer trained in-process, as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = special_tokens or ["<pad>", "<unk>", "<s>", "</s>"]
    tok = Tokenizer(models.BPE(unk_token="<unk>" if "<unk>" in specials else None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, **fast_kwargs)


# The words of captions like the demo's ("a red circle on the left on a blue background"), which
# tiny tokenizers are trained on; tests/test_world.py checks they cover the demo world's vocabulary.
CAPTION_COLORS = ("red", "green", "blue", "yellow", "purple", "orange", "white", "black")
CAPTION_SHAPES = ("circle", "square", "triangle", "cross")
CAPTION_PLACES = ("in the center", "on the left", "on the right", "at the top", "at the bottom")


def caption_corpus() -> list[str]:
    """Text like the demo's captions, to train tiny tokenizers on."""
    return [f"a {c} {s} {p} on a {b} background. The image shows a {s}."
            for c in CAPTION_COLORS for s in CAPTION_SHAPES for p in CAPTION_PLACES for b in CAPTION_COLORS if b != c]
