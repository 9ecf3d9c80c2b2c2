"""AdaptFormer: a bottleneck adapter (down, ReLU, up, times a scale) in parallel with every encoder MLP.

As in the PEFT-SAM study, the adapter reads the MLP's input; its up-projection starts at zero, so the
adapted encoder starts as the pretrained one.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from lsmfm.baselines2d.config import PeftConfig
from lsmfm.baselines2d.methods.common import wrap_part
from lsmfm.baselines2d.models.base import Segmenter2D


class ParallelAdapter(nn.Module):
    """`base_layer(x) + scale * up(dropout(relu(down(x))))`."""

    def __init__(
        self, base_layer: nn.Module, dim: int, bottleneck: int, scale: float, dropout: float
    ) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.down_proj = nn.Linear(dim, bottleneck)
        self.up_proj = nn.Linear(bottleneck, dim)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.scale = scale
        nn.init.kaiming_uniform_(self.down_proj.weight, a=math.sqrt(5))
        nn.init.zeros_(self.down_proj.bias)
        nn.init.zeros_(self.up_proj.weight)
        nn.init.zeros_(self.up_proj.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base_layer(x) + self.scale * self.up_proj(self.dropout(torch.relu(self.down_proj(x))))


def apply(model: Segmenter2D, cfg: PeftConfig) -> None:
    dim = model.hidden_size
    for layer in model.layers:
        wrap_part(
            layer,
            model.layout.mlp,
            lambda m: ParallelAdapter(m, dim, cfg.adapter_dim, cfg.adapter_scale, cfg.dropout),
        )
