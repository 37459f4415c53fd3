"""What a generator's weights compute beyond their values: the text rotary mode and the rotary grid.

Two checkpoints with equal weights but different `text_rope` (or `rope_grid`) are different
functions: in "llamagen" mode text queries and keys are zeroed, in "identity" mode they are not.
So these settings travel with the weights: our checkpoints carry them in their config, exports
repeat them at the top level, and LlamaGen's released files (which carry no config) are recognised
by their layout and taken to be "llamagen" with the image's own grid.

`settle` decides what a training run computes from what its config asks and what its starting
weights were trained with: unset settings adopt the source's, a contradiction is refused unless
the config explicitly overrides it.
"""
from __future__ import annotations

import posixpath
import re
from dataclasses import dataclass

from tessera.config import ConfigError

TEXT_ROPE_MODES = ("identity", "llamagen")
DEFAULT_TEXT_ROPE = "identity"  # fresh training: text keys keep their content

# Released LlamaGen generators whose resolution is known by name (they carry no config).
KNOWN_RESOLUTIONS = {"t2i_XL_stage1_256.pt": 256, "t2i_XL_stage2_512.pt": 512}
_RESOLUTION_IN_NAME = re.compile(r"_(\d{3,4})\.pt$")
# Parameters every LlamaGen text-to-image GPT has, under these exact names.
_LLAMAGEN_NAMES = ("cls_embedding.cap_proj.fc1.weight", "tok_embeddings.weight",
                   "layers.0.attention.wqkv.weight", "output.weight")


class IdentityMismatch(ConfigError):
    """A config asks a model to compute another function than its weights were trained for."""


@dataclass(frozen=True)
class Identity:
    text_rope: str
    rope_grid: int | None  # None: the image's own grid
    resolution: int | None  # the resolution the weights were trained at, when known
    origin: str  # "tessera" (carries its config) or "llamagen" (recognised by layout)

    @property
    def rope_span(self) -> int | None:
        """The grid the rotary positions spanned while training (None when the resolution is unknown)."""
        if self.rope_grid is not None:
            return self.rope_grid
        return self.resolution // 16 if self.resolution else None

    def as_dict(self) -> dict:
        return {"text_rope": self.text_rope, "rope_grid": self.rope_grid, "resolution": self.resolution}


def model_config_of(ckpt: dict) -> dict | None:
    meta = ckpt.get("config") if isinstance(ckpt, dict) else None
    if isinstance(meta, dict) and isinstance(meta.get("model_config"), dict):
        return meta["model_config"]
    return None


def weights_of(ckpt: dict) -> dict:
    for key in ("model", "module", "state_dict"):
        if isinstance(ckpt.get(key), dict):
            return ckpt[key]
    return ckpt


def has_llamagen_layout(ckpt: dict) -> bool:
    names = {n.split("module.", 1)[-1].split("_orig_mod.", 1)[-1] for n in weights_of(ckpt)}
    return all(n in names for n in _LLAMAGEN_NAMES)


def resolution_of(ckpt: dict, path: str) -> int | None:
    """Training resolution: an explicit key (ours, an export's, or LlamaGen's saved `args.image_size`),
    else the checkpoint's known name, else a `_NNN.pt` suffix in its name."""
    meta = ckpt.get("config")
    if isinstance(meta, dict) and meta.get("resolution"):
        return int(meta["resolution"])
    if ckpt.get("resolution"):
        return int(ckpt["resolution"])
    args = ckpt.get("args")
    if getattr(args, "image_size", None):
        return int(args.image_size)
    name = posixpath.basename(path.rstrip("/"))
    if name in KNOWN_RESOLUTIONS:
        return KNOWN_RESOLUTIONS[name]
    match = _RESOLUTION_IN_NAME.search(name)
    return int(match.group(1)) if match else None


def identity_of(ckpt: dict, path: str) -> Identity:
    """The identity of loaded checkpoint `ckpt` (read from `path`)."""
    model_config = model_config_of(ckpt)
    resolution = resolution_of(ckpt, path)
    if model_config is not None:
        return Identity(model_config.get("text_rope", DEFAULT_TEXT_ROPE), model_config.get("rope_grid"),
                        resolution, "tessera")
    if ckpt.get("text_rope") in TEXT_ROPE_MODES:  # a file that states it without our full config
        return Identity(ckpt["text_rope"], ckpt.get("rope_grid"), resolution, "tessera")
    if has_llamagen_layout(ckpt):
        return Identity("llamagen", None, resolution, "llamagen")
    raise ValueError(f"{path}: neither a Tessera checkpoint (no config) nor a LlamaGen text-to-image "
                     f"checkpoint (no {', '.join(_LLAMAGEN_NAMES)})")


def settle(text_rope: str | None, rope_grid: int | None, source: Identity | None,
           override: bool = False, source_name: str = "the starting weights") -> tuple[str, int | None]:
    """(text_rope, rope_grid) a run computes with. Unset values adopt the source's; set values that
    contradict it raise IdentityMismatch (one line) unless `override`."""
    if source is None:
        return text_rope or DEFAULT_TEXT_ROPE, rope_grid
    if override:
        return text_rope or source.text_rope, rope_grid if rope_grid is not None else source.rope_grid
    if text_rope is not None and text_rope != source.text_rope:
        raise IdentityMismatch(
            f"text_rope {text_rope!r} asked, but {source_name} were trained with {source.text_rope!r}: "
            f"leave text_rope unset to adopt it, or set identity_override: true to change the function")
    if rope_grid is None:
        return source.text_rope, source.rope_grid
    span = source.rope_span
    if span is not None and rope_grid != span:
        raise IdentityMismatch(
            f"rope_grid {rope_grid} asked, but {source_name} were trained with rotary positions over a "
            f"{span}x{span} grid: leave rope_grid unset, set it to {span}, or set identity_override: true")
    return source.text_rope, rope_grid
