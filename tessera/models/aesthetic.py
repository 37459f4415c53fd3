"""The LAION improved aesthetic predictor: an MLP on L2-normalised CLIP ViT-L/14 image embeddings.

No activations between the linear layers, as in the released weights; state-dict keys are
`layers.{0,2,4,6,7}.*` (the dropouts sit at 1, 3, 5). Scores run roughly from 1 to 10.
"""
from __future__ import annotations

import torch
from torch import nn

from tessera.models.weights import load_state_dict


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
    """Load a predictor file strictly; its input width is read from the file."""
    state = load_state_dict(path)
    if "layers.0.weight" not in state:
        raise ValueError(f"{path}: not an aesthetic predictor (no layers.0.weight; keys: {sorted(state)[:5]})")
    head = AestheticHead(state["layers.0.weight"].shape[1])
    head.load_state_dict(state, strict=True)
    return head.eval()


def build_tiny(path: str, embed_dim: int = 32, seed: int = 1) -> None:
    import os

    torch.manual_seed(seed)
    os.makedirs(path, exist_ok=True)
    torch.save(AestheticHead(embed_dim).state_dict(), os.path.join(path, "aesthetic.pth"))
