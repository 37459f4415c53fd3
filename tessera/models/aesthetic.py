"""The LAION improved aesthetic predictor: an MLP on L2-normalised CLIP ViT-L/14 image embeddings.

No activations between the linear layers, as in the released weights; state-dict keys are
`layers.{0,2,4,6,7}.*` (the dropouts sit at 1, 3, 5). Scores run roughly from 1 to 10.
"""
from __future__ import annotations

import torch
from torch import nn

from tessera.models.weights import load_embedding_head, save_tiny_head


class AestheticHead(nn.Module):
    def __init__(self, embed_dim: int = 768):
        super().__init__()
        self.embed_dim = embed_dim
        self.layers = nn.Sequential(
            nn.Linear(embed_dim, 1024),
            nn.Dropout(0.2),
            nn.Linear(1024, 128),
            nn.Dropout(0.2),
            nn.Linear(128, 64),
            nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        return self.layers(embeddings).squeeze(-1)


def load_aesthetic(path: str) -> AestheticHead:
    return load_embedding_head(path, AestheticHead, "layers.0.weight", "an aesthetic predictor")


def build_tiny(path: str, embed_dim: int = 32, seed: int = 1) -> None:
    save_tiny_head(AestheticHead, path, "aesthetic.pth", embed_dim, seed)
