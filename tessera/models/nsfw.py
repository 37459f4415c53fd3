"""LAION's CLIP-based NSFW detector as a torch module: a small MLP on CLIP ViT-L/14 image embeddings.

The layout of the PyTorch port of the released Keras model: a normalisation with stored mean and
variance, then 768 -> 64 -> 512 -> 256 -> 1 with ReLUs and a sigmoid. punsafe is its output.
"""
from __future__ import annotations

import torch
from torch import nn

from tessera.models.weights import load_embedding_head, save_tiny_head


class Normalization(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("variance", torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.variance.sqrt()


class NsfwHead(nn.Module):
    def __init__(self, embed_dim: int = 768):
        super().__init__()
        self.embed_dim = embed_dim
        self.norm = Normalization(embed_dim)
        self.linear_1 = nn.Linear(embed_dim, 64)
        self.linear_2 = nn.Linear(64, 512)
        self.linear_3 = nn.Linear(512, 256)
        self.linear_4 = nn.Linear(256, 1)

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        x = self.norm(embeddings)
        x = torch.relu(self.linear_1(x))
        x = torch.relu(self.linear_2(x))
        x = torch.relu(self.linear_3(x))
        return torch.sigmoid(self.linear_4(x)).squeeze(-1)


def load_nsfw(path: str) -> NsfwHead:
    return load_embedding_head(path, NsfwHead, "linear_1.weight", "an NSFW head")


def build_tiny(path: str, embed_dim: int = 32, seed: int = 2) -> None:
    save_tiny_head(NsfwHead, path, "nsfw.pth", embed_dim, seed)
