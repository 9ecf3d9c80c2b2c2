"""Light heads on top of the backbone's dense features.

- `ProjectionHead`: DINO/iBOT head, an MLP onto a bottleneck then cosine similarity to K learnable
  prototypes. On (N, C) rows or per voxel on (B, C, D, H, W) (then it is a 1x1x1-conv MLP).
- `ReconstructionHead`: a small conv decoder from dense features back to image intensities.

Example:
    >>> head = ProjectionHead(16, n_prototypes=32, hidden_dim=64, bottleneck_dim=8)
    >>> head(torch.zeros(2, 16, 4, 4, 4)).shape
    torch.Size([2, 32, 4, 4, 4])
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


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
    """3x3x3 conv + instance norm + GELU, then a 1x1x1 conv to the image channels.

    Kept light on purpose: the backbone, not the decoder, should learn the structure.
    """

    def __init__(self, in_dim: int, out_channels: int = 1, hidden_dim: int = 32) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv3d(in_dim, hidden_dim, kernel_size=3, padding=1),
            nn.InstanceNorm3d(hidden_dim, affine=True), nn.GELU(),
            nn.Conv3d(hidden_dim, out_channels, kernel_size=1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, D, H, W) features -> (B, out_channels, D, H, W) intensities."""
        return self.net(x)
