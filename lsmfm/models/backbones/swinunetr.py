"""MONAI SwinUNETR as a 3D backbone: its config, network, model-card line and the paper-checkpoint mapping.

MONAI >= 1.5 has no `img_size` argument; every spatial size must be a multiple of 32.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence

import torch

import lsmfm._monai  # noqa: F401  (before any MONAI import: MONAI without transformers)
from monai.networks.nets import SwinUNETR  # noqa: I001
from lsmfm.errors import InputError
from lsmfm.models.backbones.base import Backbone, norm_from_state
from lsmfm.models.backbones.registry import BackboneConfig


@dataclass
class SwinUNETRConfig(BackboneConfig):
    """MONAI SwinUNETR.

    Args:
        feature_size: 24, 36, 48, ... (a multiple of 12).
        norm: "instance" (SwinUNETR's usual choice; it needs inputs of 64³ or more in training) or "batch".
        use_checkpoint: gradient checkpointing.
    """

    arch: Literal["swinunetr"] = "swinunetr"
    feature_size: int = 24
    norm: str = "batch"
    use_checkpoint: bool = False

    def __post_init__(self) -> None:
        if self.feature_size % 12:
            raise ValueError(f"swinunetr feature_size must be a multiple of 12, got {self.feature_size}")
        super().__post_init__()

    @property
    def size_multiple(self) -> int:
        return 32

    def network_size_problem(self, size: Sequence[int]) -> str | None:
        """Instance norm normalises each sample over its voxels, in eval mode too, and torch refuses one
        voxel: the 1/32 bottleneck must have two or more (e.g. 32 x 32 x 64; the paper's 64³ and 96³)."""
        if self.norm == "instance" and math.prod(s // 32 for s in size) < 2:
            return (f"gives the network {list(size)} voxels, one at its 1/32 bottleneck, which its instance "
                    "norm cannot normalise: use 64 or more along at least one axis")
        return None

    def build(self) -> SwinUNETRBackbone:
        return SwinUNETRBackbone(self)

    def monai_network(self) -> tuple[str, dict[str, Any]]:
        return "SwinUNETR", {"in_channels": self.in_channels, "out_channels": self.out_channels,
                             "feature_size": self.feature_size, "use_checkpoint": self.use_checkpoint,
                             "norm_name": self.norm, "spatial_dims": 3}

    def card_line(self) -> str:
        return (f"MONAI SwinUNETR, feature_size {self.feature_size}, {self.norm} norm, "
                f"{self.out_channels} output channels")

    @classmethod
    def from_paper_state(cls, state: Mapping[str, torch.Tensor], path: str | Path,
                         hp: Mapping[str, Any]) -> SwinUNETRConfig | None:
        embed = state.get("swinViT.patch_embed.proj.weight")
        if embed is None:
            return None
        out = state.get("out.conv.conv.weight")
        if out is None:
            raise InputError(path, "SwinUNETR weights without out.conv.conv.weight (output layer)")
        norm = norm_from_state(state, "encoder1.layer.norm1", path)
        return cls(in_channels=int(embed.shape[1]), out_channels=int(out.shape[0]),
                   feature_size=int(embed.shape[0]), norm=norm)


class SwinUNETRBackbone(Backbone, SwinUNETR):
    """MONAI SwinUNETR whose output channels are the dense feature dimension."""

    def __init__(self, config: SwinUNETRConfig) -> None:
        SwinUNETR.__init__(self, **config.monai_network()[1])
        self.config = config

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.from_network(SwinUNETR.forward(self, self.to_network(x)), x.shape[2:])
