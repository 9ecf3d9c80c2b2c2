"""A toy 3D backbone: everything an architecture needs, in one module (registered by one line in
tests/test_structure.py). A strided conv down and a transposed conv back up."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from lsmfm.models.backbones.base import Backbone
from lsmfm.models.backbones.registry import BackboneConfig


@dataclass
class ToyNetConfig(BackboneConfig):
    """Args: width: channels of the one hidden layer."""

    arch: Literal["toy"] = "toy"
    out_channels: int = 8
    width: int = 4

    @property
    def size_multiple(self) -> int:
        return 2

    def build(self) -> ToyNet:
        return ToyNet(self)

    def card_line(self) -> str:
        return f"toy conv net, width {self.width}, {self.out_channels} output channels"


class ToyNet(Backbone, nn.Module):
    def __init__(self, config: ToyNetConfig) -> None:
        nn.Module.__init__(self)
        self.config = config
        self.down = nn.Conv3d(config.in_channels, config.width, 3, stride=2, padding=1)
        self.up = nn.ConvTranspose3d(config.width, config.out_channels, 2, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        return self.up(torch.relu(self.down(x)))
