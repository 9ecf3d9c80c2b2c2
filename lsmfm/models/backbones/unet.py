"""MONAI UNet as a 3D backbone: its config, network, model-card line and the paper-checkpoint mapping.

Example:
    >>> net = UNetConfig(channels=[8, 16, 32], strides=[2, 2], out_channels=16).build()
    >>> net(torch.zeros(1, 1, 32, 32, 32)).shape
    torch.Size([1, 16, 32, 32, 32])
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping

import torch

import lsmfm._monai  # noqa: F401  (before any MONAI import: MONAI without transformers)
from monai.networks.nets import UNet  # noqa: I001
from lsmfm.errors import InputError
from lsmfm.models.backbones.base import Backbone, norm_from_state
from lsmfm.models.backbones.registry import BackboneConfig


@dataclass
class UNetConfig(BackboneConfig):
    """MONAI UNet; enough to rebuild the network from a checkpoint alone.

    Args:
        channels, strides, num_res_units: UNet arguments (paper: 32-512, 2-2-2-1, 2).
        norm: "batch" (the paper's UNet) or "instance".
    """

    arch: Literal["unet"] = "unet"
    channels: list[int] = field(default_factory=lambda: [32, 64, 128, 256, 512])
    strides: list[int] = field(default_factory=lambda: [2, 2, 2, 1])
    num_res_units: int = 2
    norm: str = "batch"

    def __post_init__(self) -> None:
        if len(self.strides) != len(self.channels) - 1:
            raise ValueError(f"unet needs len(strides) == len(channels) - 1, got {self.strides} for "
                             f"{self.channels}")
        super().__post_init__()

    @property
    def size_multiple(self) -> int:
        return math.prod(self.strides)

    def build(self) -> UNetBackbone:
        return UNetBackbone(self)

    def monai_network(self) -> tuple[str, dict[str, Any]]:
        return "UNet", {"spatial_dims": 3, "in_channels": self.in_channels, "out_channels": self.out_channels,
                        "channels": list(self.channels), "strides": list(self.strides),
                        "num_res_units": self.num_res_units, "norm": self.norm}

    def card_line(self) -> str:
        return (f"MONAI UNet, channels {'-'.join(map(str, self.channels))}, "
                f"strides {'-'.join(map(str, self.strides))}, residual units {self.num_res_units}, "
                f"{self.norm} norm, {self.out_channels} output channels")

    @classmethod
    def from_paper_state(cls, state: Mapping[str, torch.Tensor], path: str | Path,
                         hp: Mapping[str, Any]) -> UNetConfig | None:
        """Walk MONAI UNet's nesting: level i lives under model.(1.submodule.)^i; the bottom has no 0./2."""
        if not any(k.startswith("model.0.") for k in state):
            return None
        unet_hp = hp.get("unet") if isinstance(hp.get("unet"), dict) else {}
        residual = "model.0.conv.unit0.conv.weight" in state
        first = "conv.unit0.conv.weight" if residual else "conv.weight"
        channels, strided = [], []
        level = "model."
        while f"{level}0.{first}" in state:
            channels.append(int(state[f"{level}0.{first}"].shape[0]))
            res = state.get(f"{level}0.residual.weight")
            # MONAI: a 3x3x3 residual conv means a strided level, 1x1x1 (or none, same width) stride 1;
            # without residual units the stride is not visible in the shapes and the paper's 2 is assumed.
            strided.append(res.shape[-1] != 1 if res is not None else not residual)
            level += "1.submodule."
        if f"{level}{first}" not in state or not channels:
            raise InputError(path, f"UNet weights without the expected bottom layer {level}{first}")
        channels.append(int(state[f"{level}{first}"].shape[0]))
        strides = [2 if s else 1 for s in strided]
        hp_strides = unet_hp.get("strides")
        if isinstance(hp_strides, (list, tuple)) and len(hp_strides) == len(strides):
            if [int(s) != 1 for s in hp_strides] != strided:
                raise InputError(path, f"hyper_parameters strides {list(hp_strides)} disagree with the "
                                       "weights")
            strides = [int(s) for s in hp_strides]
        units = sum(1 for k in state if k.startswith("model.0.conv.unit") and k.endswith(".conv.weight"))
        up = state["model.2.0.conv.weight" if residual else "model.2.conv.weight"]
        stem = "model.0.conv.unit0.adn.N" if residual else "model.0.adn.N"
        return cls(in_channels=int(state[f"model.0.{first}"].shape[1]), out_channels=int(up.shape[1]),
                   channels=channels, strides=strides, num_res_units=units,
                   norm=norm_from_state(state, stem, path))


class UNetBackbone(Backbone, UNet):
    """MONAI UNet whose output channels are the dense feature dimension."""

    def __init__(self, config: UNetConfig) -> None:
        UNet.__init__(self, **config.monai_network()[1])
        self.config = config

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.from_network(UNet.forward(self, self.to_network(x)), x.shape[2:])
