"""Tiny models for the demo and the tests, built offline in the real checkpoint formats.

A config names a model by path or hub id (the real thing, fetched into models_root by
`tessera fetch-models`) or as `tiny:NAME`: the tiny model of
that kind, built once under the run's `models_root` and then loaded through the very same code
path as a real checkpoint. Nothing is ever downloaded for a tiny model.
"""
from __future__ import annotations

import hashlib
import importlib
import inspect
import logging
import os
from typing import Callable

# NAME -> "module:function(path)" that builds and saves the tiny model at `path`.
BUILDERS: dict[str, str] = {
    "clip": "tessera.models.clip:build_tiny",
    "aesthetic": "tessera.models.aesthetic:build_tiny",
    "nsfw": "tessera.models.nsfw:build_tiny",
    "watermark": "tessera.models.watermark:build_tiny",
    "vq": "tessera.models.vq:build_tiny",
    "t5": "tessera.models.text_encoder:build_tiny",
    "llava": "tessera.models.llava:build_tiny",
    # Trained on the demo's world (tessera.demo.world_models), shipped under world_weights/.
    "world-clip": "tessera.models.tiny:install_world_clip",
    "world-aesthetic": "tessera.models.tiny:install_world_aesthetic",
    "world-watermark": "tessera.models.tiny:install_world_watermark",
    "world-llava": "tessera.models.tiny:install_world_llava",
}
WORLD_WEIGHTS = os.path.join(os.path.dirname(__file__), "world_weights")

PREFIX = "tiny:"
log = logging.getLogger(__name__)


def resolve(ref: str, models_root: str) -> str:
    """The local path to load for a config's model reference: a tiny one is built if needed, any
    other is looked up under models_root (see tessera.models.fetch.locate), never downloaded."""
    if not ref.startswith(PREFIX):
        from tessera.models.fetch import locate

        return locate(ref, models_root)
    name = ref[len(PREFIX):]
    if name not in BUILDERS:
        raise ValueError(f"unknown tiny model {ref!r}; known: {', '.join(sorted(BUILDERS)) or 'none'}")
    path = os.path.join(models_root, name)
    wanted = build_id(name)
    if _built(path) != wanted:
        module, func = BUILDERS[name].split(":")
        builder: Callable[[str], None] = getattr(importlib.import_module(module), func)
        if os.path.exists(path):
            log.info("%s: rebuilding %s, its build changed", path, ref)
        tmp = f"{path}.tmp-{os.getpid()}"
        builder(tmp)
        with open(os.path.join(tmp, ".complete"), "w") as f:
            f.write(wanted)
        if os.path.exists(path):
            import shutil

            shutil.rmtree(path)
        os.replace(tmp, path)
    return path


def build_id(name: str) -> str:
    """What a tiny model is built from: its builder's module source, or the shipped weights' sums.
    A model built from anything else is rebuilt, and the stages that used it redo their shards."""
    module = BUILDERS[name].split(":")[0]
    if name.startswith("world-"):
        with open(os.path.join(WORLD_WEIGHTS, "SHA256SUMS"), "rb") as f:
            source = b"".join(line for line in f if f" {name[len('world-'):]}/".encode() in line)
    else:
        source = inspect.getsource(importlib.import_module(module)).encode()
    return hashlib.sha256(source).hexdigest()[:16]


def build_of(path: str | None) -> str:
    """The build id of the tiny model at `path` (its folder, or a file in it); "" for any other model.
    Stage lineages include it, so a rebuilt tiny model redoes the shards computed with the old one."""
    if not path:
        return ""
    return _built(path if os.path.isdir(path) else os.path.dirname(path)) or ""


def _built(path: str) -> str | None:
    try:
        with open(os.path.join(path, ".complete")) as f:
            return f.read().strip()
    except FileNotFoundError:
        return None


def install_world(name: str, path: str) -> None:
    """Copy the shipped world-trained model `name` to `path`."""
    import shutil

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


def caption_corpus() -> list[str]:
    """Text like the synthetic set's captions, to train tiny tokenizers on."""
    from tessera.demo.synthetic import COLORS, PLACES, SHAPES

    return [f"a {c} {s} {p} on a {b} background. The image shows a {s}."
            for c in COLORS for s in SHAPES for p in PLACES for b in COLORS if b != c]
