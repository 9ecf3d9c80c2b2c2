"""3D backbones behind one interface: dense per-voxel features and a pooled embedding.

The classes subclass MONAI's networks directly, so their `state_dict()` keys are exactly MONAI's
(and those of the LSM foundation model paper's `student_encoder.*` / `teacher_encoder.*` weights).

Example:
    >>> cfg = BackboneConfig(arch="unet", channels=[8, 16, 32], strides=[2, 2], out_channels=16)
    >>> net = build_backbone(cfg)
    >>> net(torch.zeros(1, 1, 32, 32, 32)).shape
    torch.Size([1, 16, 32, 32, 32])
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

import lsmfm._monai  # noqa: F401  (before any MONAI import: MONAI without transformers)
from monai.networks.nets import SwinUNETR, UNet  # noqa: I001
from lsmfm.weights.hub import HubMixin


@dataclass
class BackboneConfig:
    """Architecture and its arguments; enough to rebuild the network from a checkpoint alone.

    Args:
        arch: "unet" (MONAI UNet) or "swinunetr" (MONAI SwinUNETR).
        in_channels: image channels.
        out_channels: dense feature (and pooled embedding) dimension.
        channels, strides, num_res_units: UNet arguments (paper: 32-512, 2-2-2-1, 2).
        norm: normalisation layer of either network ("batch" as in the paper's UNet, "instance" is
            SwinUNETR's usual choice; SwinUNETR with instance norm needs inputs of 64³ or more in training).
        feature_size, use_checkpoint: SwinUNETR arguments (24/36/48; gradient checkpointing).
    """

    arch: Literal["unet", "swinunetr"] = "unet"
    in_channels: int = 1
    out_channels: int = 128
    channels: list[int] = field(default_factory=lambda: [32, 64, 128, 256, 512])
    strides: list[int] = field(default_factory=lambda: [2, 2, 2, 1])
    num_res_units: int = 2
    norm: str = "batch"
    feature_size: int = 24
    use_checkpoint: bool = False

    def __post_init__(self) -> None:
        if self.arch == "unet" and len(self.strides) != len(self.channels) - 1:
            raise ValueError(f"unet needs len(strides) == len(channels) - 1, got {self.strides} for {self.channels}")
        if self.arch == "swinunetr" and self.feature_size % 12:
            raise ValueError(f"swinunetr feature_size must be a multiple of 12, got {self.feature_size}")
        if min(self.in_channels, self.out_channels) < 1:
            raise ValueError("in_channels and out_channels must be >= 1")

    @property
    def size_multiple(self) -> int:
        """Every spatial input size must be a multiple of this."""
        if self.arch == "swinunetr":
            return 32
        m = 1
        for s in self.strides:
            m *= s
        return m


class BackboneMixin(HubMixin):
    """Shared API: `forward(x)` gives (B, C, D, H, W) features, `embed(x)` a pooled (B, C) vector.

    `HubMixin` adds `save_pretrained(dir)`, `from_pretrained(source)` and `push_to_hub(repo_id)`.
    """

    config: BackboneConfig

    @property
    def feature_dim(self) -> int:
        return self.config.out_channels

    def check_input(self, x: torch.Tensor) -> None:
        m = self.config.size_multiple
        if x.ndim != 5 or x.shape[1] != self.config.in_channels:
            raise ValueError(f"expected input (B, {self.config.in_channels}, D, H, W), got {tuple(x.shape)}")
        if any(s % m for s in x.shape[2:]):
            raise ValueError(f"{self.config.arch} needs spatial sizes divisible by {m}, got {tuple(x.shape[2:])}")

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Global average of the dense features: one embedding per patch."""
        return self(x).mean(dim=(2, 3, 4))


class UNetBackbone(BackboneMixin, UNet):
    """MONAI UNet whose output channels are the dense feature dimension."""

    def __init__(self, config: BackboneConfig) -> None:
        UNet.__init__(self, spatial_dims=3, in_channels=config.in_channels, out_channels=config.out_channels,
                      channels=list(config.channels), strides=list(config.strides),
                      num_res_units=config.num_res_units, norm=config.norm)
        self.config = config

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        return UNet.forward(self, x)


class SwinUNETRBackbone(BackboneMixin, SwinUNETR):
    """MONAI SwinUNETR (no img_size argument in MONAI >= 1.5); sizes must be multiples of 32."""

    def __init__(self, config: BackboneConfig) -> None:
        SwinUNETR.__init__(self, in_channels=config.in_channels, out_channels=config.out_channels,
                           feature_size=config.feature_size, use_checkpoint=config.use_checkpoint,
                           norm_name=config.norm, spatial_dims=3)
        self.config = config

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        return SwinUNETR.forward(self, x)


def build_backbone(config: BackboneConfig) -> nn.Module:
    """Construct the backbone named by `config.arch`."""
    if config.arch == "unet":
        return UNetBackbone(config)
    return SwinUNETRBackbone(config)
