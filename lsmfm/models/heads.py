"""Light heads on top of the backbone's dense features.

- `ProjectionHead`: DINO/iBOT head, an MLP onto a bottleneck then cosine similarity to K learnable
  prototypes. On (N, C) rows or per voxel on (B, C, D, H, W) (then it is a 1x1x1-conv MLP).
- `ReconstructionHead`: a small conv decoder from dense features back to image intensities.
- `embedding_head`: the projection of pooled image features or text features into the shared
  image-text space, a linear layer or the paper's MLP + LayerNorm.

Example:
    >>> head = ProjectionHead(16, n_prototypes=32, hidden_dim=64, bottleneck_dim=8)
    >>> head(torch.zeros(2, 16, 4, 4, 4)).shape
    torch.Size([2, 32, 4, 4, 4])
"""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

EmbeddingHead = Literal["linear", "mlp"]


class ProjectionHead(nn.Module):
    """MLP -> L2-normalised bottleneck -> cosine logits against K L2-normalised prototypes.

    The logits lie in [-1, 1] (divided by a temperature in the loss); normalising the prototypes is
    DINO's weight-normalised last layer with its norm fixed to 1, which keeps the head from blowing up.

    Args:
        in_dim: feature channels C.
        n_prototypes: K.
        hidden_dim, bottleneck_dim: MLP widths.
    """

    def __init__(self, in_dim: int, n_prototypes: int, hidden_dim: int = 256,
                 bottleneck_dim: int = 64) -> None:
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(in_dim, hidden_dim), nn.GELU(),
            nn.Linear(hidden_dim, hidden_dim), nn.GELU(),
            nn.Linear(hidden_dim, bottleneck_dim),
        )
        self.prototypes = nn.Parameter(torch.randn(n_prototypes, bottleneck_dim) * 0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C) -> (N, K), or dense (B, C, D, H, W) -> (B, K, D, H, W)."""
        if x.ndim == 5:
            return self.logits(x.movedim(1, -1)).movedim(-1, 1)
        return self.logits(x)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Channels-last (..., C) -> (..., K) cosine logits."""
        z = F.normalize(self.mlp(x), dim=-1)
        return z @ F.normalize(self.prototypes, dim=-1).t()


class ReconstructionHead(nn.Module):
    """A light conv decoder to the image channels; kept light on purpose: the backbone, not the decoder,
    should learn the structure.

    Args:
        in_dim: feature channels.
        out_channels: image channels.
        hidden_dim: decoder width.
        form: "conv_norm": 3x3x3 conv + instance norm + GELU, then a 1x1x1 conv; "two_conv": the paper's
            LightDecoder, 3x3x3 conv to hidden_dim, ReLU, 3x3x3 conv to hidden_dim // 2, ReLU, 1x1x1 conv.
    """

    def __init__(self, in_dim: int, out_channels: int = 1, hidden_dim: int = 32,
                 form: Literal["conv_norm", "two_conv"] = "conv_norm") -> None:
        super().__init__()
        if form == "two_conv":
            half = max(1, hidden_dim // 2)
            self.net = nn.Sequential(
                nn.Conv3d(in_dim, hidden_dim, kernel_size=3, padding=1), nn.ReLU(),
                nn.Conv3d(hidden_dim, half, kernel_size=3, padding=1), nn.ReLU(),
                nn.Conv3d(half, out_channels, kernel_size=1),
            )
            return
        self.net = nn.Sequential(
            nn.Conv3d(in_dim, hidden_dim, kernel_size=3, padding=1),
            nn.InstanceNorm3d(hidden_dim, affine=True), nn.GELU(),
            nn.Conv3d(hidden_dim, out_channels, kernel_size=1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, D, H, W) features -> (B, out_channels, D, H, W) intensities."""
        return self.net(x)


def embedding_head(form: EmbeddingHead, in_dim: int, embed_dim: int) -> nn.Module:
    """Projection into the image-text space: "linear", or "mlp", the paper's image_proj / text_proj
    (Linear(in, E), ReLU, Linear(E, E), LayerNorm(E))."""
    if form == "mlp":
        return nn.Sequential(nn.Linear(in_dim, embed_dim), nn.ReLU(), nn.Linear(embed_dim, embed_dim),
                             nn.LayerNorm(embed_dim))
    return nn.Linear(in_dim, embed_dim)
