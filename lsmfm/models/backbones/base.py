"""The interface every 3D backbone shares: dense per-voxel features and a pooled embedding, input checks,
and the Hub-style `save_pretrained` / `from_pretrained` / `push_to_hub` of the weights format.

Architectures subclass `Backbone` together with their network (see `unet.py`), so their `state_dict()`
keys stay the network's own (MONAI's, for the LSM foundation model paper's weights).
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import torch
import torch.nn.functional as F

from lsmfm.errors import InputError
from lsmfm.models.backbones.registry import BackboneConfig
from lsmfm.weights.hub import HubMixin


class Backbone(HubMixin):
    """Shared API: `forward(x)` gives (B, C, D, H, W) features, `embed(x)` a pooled (B, C) vector.

    Inputs and outputs are (z, y, x) whatever axis order the network was trained in (`config.axes`):
    each architecture's `forward` wraps its network in `to_network` / `from_network`.

    `HubMixin` adds `save_pretrained(dir)`, `from_pretrained(source)` and `push_to_hub(repo_id)`.
    """

    config: BackboneConfig

    @property
    def feature_dim(self) -> int:
        return self.config.out_channels

    def to_network(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, z, y, x) input, checked, at the scale and in the axis order the network was trained on."""
        self.check_input(x)
        scale = self.config.input_scale
        if scale != 1.0:
            x = F.interpolate(x, size=tuple(round(n * scale) for n in x.shape[2:]), mode="trilinear",
                              align_corners=False)
        return x.permute(0, 1, 4, 3, 2).contiguous() if self.config.axes == "xyz" else x

    def from_network(self, y: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
        """The network's dense output back in (B, C, z, y, x) order at the input's `size`."""
        y = y.permute(0, 1, 4, 3, 2).contiguous() if self.config.axes == "xyz" else y
        if self.config.input_scale != 1.0:
            y = F.interpolate(y, size=tuple(size), mode="trilinear", align_corners=False)
        return y

    def check_input(self, x: torch.Tensor) -> None:
        if x.ndim != 5 or x.shape[1] != self.config.in_channels:
            raise ValueError(f"expected input (B, {self.config.in_channels}, D, H, W), got {tuple(x.shape)}")
        problem = self.config.size_problem(x.shape[2:])
        if problem is not None:
            raise ValueError(f"input of spatial size {tuple(x.shape[2:])} {problem}")

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Global average of the dense features: one embedding per patch."""
        return self(x).mean(dim=(2, 3, 4))


def norm_from_state(state: Mapping[str, torch.Tensor], stem: str, path: str | Path) -> str:
    """MONAI norms in a state dict: batch has running stats, affine-free instance norm (MONAI's default)
    has no tensors."""
    if f"{stem}.running_mean" in state:
        return "batch"
    if f"{stem}.weight" in state:
        raise InputError(path, f"unsupported normalisation layer at {stem} (only batch and instance norm)")
    return "instance"
