"""SSF: a learnable per-channel scale and shift after every projection, MLP linear and LayerNorm of the
encoder.

Scales start at 1 and shifts at 0, so the adapted encoder starts as the pretrained one.
"""

from __future__ import annotations

import torch
from torch import nn

from lsmfm.baselines2d.config import PeftConfig
from lsmfm.baselines2d.methods.common import get_part, wrap_part
from lsmfm.baselines2d.models.base import Segmenter2D


class ScaleShift(nn.Module):
    """`base_layer(x) * scale + shift` over the last (channel) dimension."""

    def __init__(self, base_layer: nn.Module, dim: int) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.scale = nn.Parameter(torch.ones(dim))
        self.shift = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base_layer(x) * self.scale + self.shift


def _out_width(module: nn.Module) -> int:
    if isinstance(module, nn.LayerNorm):
        return int(module.normalized_shape[-1])
    return int(module.out_features)


def apply(model: Segmenter2D, cfg: PeftConfig) -> None:
    layout = model.layout
    for layer in model.layers:
        mlp_linears = [
            f"{layout.mlp}.{n}"
            for n, m in get_part(layer, layout.mlp).named_modules()
            if isinstance(m, nn.Linear)
        ]
        projections = [layout.qkv] if layout.qkv else [layout.q, layout.k, layout.v]
        for path in [*projections, layout.attn_out, *mlp_linears, *layout.norms]:
            wrap_part(layer, path, lambda m: ScaleShift(m, _out_width(m)))
