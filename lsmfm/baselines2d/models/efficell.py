"""A frozen-encoder adapter decoder in the spirit of EffiCell-Seg: a few million trainable parameters.

The encoder stays frozen; the decoder reads four evenly spaced layers plus the final features, and adds
parameter-free structure priors computed from those frozen features: the cosine affinity of each patch
to its right and lower neighbours (low affinity marks a boundary between structures). A shallow
full-resolution stem on the image restores edges lost at patch resolution.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def tap_layers(n_layers: int, n_taps: int = 4) -> tuple[int, ...]:
    """`n_taps` evenly spaced layer indices ending at the last layer (ViT-B: 2, 5, 8, 11)."""
    return tuple(sorted({max(0, (n_layers * (i + 1)) // n_taps - 1) for i in range(n_taps)}))


def affinity_priors(features: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) -> (B, 2, h, w): cosine similarity to the right and lower neighbour (1 at the border)."""
    f = F.normalize(features, dim=1)
    right = F.pad((f[..., :, 1:] * f[..., :, :-1]).sum(1, keepdim=True), (0, 1, 0, 0), value=1.0)
    down = F.pad((f[..., 1:, :] * f[..., :-1, :]).sum(1, keepdim=True), (0, 0, 0, 1), value=1.0)
    return torch.cat([right, down], dim=1)


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.GroupNorm(8, cout), nn.GELU())


class EffiCellHead(nn.Module):
    """Multi-level adapter decoder: (pixels, final features, tapped layer maps) -> (B, 1, S, S) logits.

    Args:
        hidden: width of the tapped encoder layers.
        final_channels: channels of the final feature map (SAM: its neck's 256).
        taps: indices of the encoder layers read by the decoder.
        dim: decoder width (256 at ViT-B scale: about 2.7 M parameters).
    """

    def __init__(self, hidden: int, final_channels: int, taps: tuple[int, ...], dim: int) -> None:
        super().__init__()
        self.taps = taps
        n_levels = len(taps) + 1
        self.proj = nn.ModuleList([nn.Conv2d(hidden, dim, 1) for _ in taps])
        self.proj_final = nn.Conv2d(final_channels, dim, 1)
        self.fuse = nn.Sequential(_block(dim + 2 * n_levels, dim), _block(dim, dim))
        self.up1 = nn.ConvTranspose2d(dim, dim // 2, 2, stride=2)
        self.refine1 = _block(dim // 2, dim // 2)
        self.up2 = nn.ConvTranspose2d(dim // 2, dim // 4, 2, stride=2)
        self.refine2 = _block(dim // 4, dim // 4)
        stem = max(8, dim // 8)
        self.stem = nn.Sequential(_block(3, stem), _block(stem, stem))
        self.out = nn.Conv2d(dim // 4 + stem, 1, 1)

    def forward(self, pixels: torch.Tensor, final: torch.Tensor, taps: list[torch.Tensor]) -> torch.Tensor:
        levels = list(taps) + [final]
        priors = torch.cat([affinity_priors(f) for f in levels], dim=1)
        x = self.proj_final(final) + sum(p(t) for p, t in zip(self.proj, taps))
        x = self.fuse(torch.cat([x, priors], dim=1))
        x = self.refine1(self.up1(x))
        x = self.refine2(self.up2(x))
        x = F.interpolate(x, size=pixels.shape[-2:], mode="bilinear", align_corners=False)
        return self.out(torch.cat([x, self.stem(pixels)], dim=1))
