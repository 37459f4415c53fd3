"""Reading checkpoint files safely: safetensors, or torch.load with weights_only=True."""
from __future__ import annotations

import os

import torch


def load_state_dict(path: str, key: str | None = None) -> dict[str, torch.Tensor]:
    """A state dict from `path`; with `key`, also accept the dict nested under that key."""
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    state = torch.load(path, map_location="cpu", weights_only=True)
    if key is not None and isinstance(state, dict) and isinstance(state.get(key), dict):
        state = state[key]
    if not isinstance(state, dict):
        raise ValueError(f"{path}: expected a state dict, found {type(state).__name__}")
    return state


def load_embedding_head(path: str, head_class, first_weight: str, what: str):
    """A head on CLIP image embeddings, loaded strictly; its input width is read from `first_weight`."""
    state = load_state_dict(path)
    if first_weight not in state:
        raise ValueError(f"{path}: not {what} (no {first_weight}; keys: {sorted(state)[:5]})")
    head = head_class(state[first_weight].shape[1])
    head.load_state_dict(state, strict=True)
    return head.eval()


def save_tiny_head(head_class, folder: str, filename: str, embed_dim: int, seed: int) -> None:
    """A randomly initialised head of `embed_dim` inputs, saved like its released weights."""
    torch.manual_seed(seed)
    os.makedirs(folder, exist_ok=True)
    torch.save(head_class(embed_dim).state_dict(), os.path.join(folder, filename))


WEIGHT_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors")


def weights_file(path: str) -> str:
    """A weights file given as itself or as a folder holding exactly one."""
    if not os.path.isdir(path):
        if not os.path.exists(path):
            raise FileNotFoundError(f"weights file {path} does not exist")
        return path
    found = sorted(n for n in os.listdir(path) if n.endswith(WEIGHT_SUFFIXES))
    if len(found) != 1:
        raise FileNotFoundError(f"{path}: expected one weights file in it, found {found or 'none'}")
    return os.path.join(path, found[0])
