"""The one registry of 3D backbones, by architecture name (`arch` in every config and model folder).

Each architecture is one module with one config class (a `BackboneConfig` subclass whose `arch` field is
its tag) that owns everything about it: its arguments and their checks, the size multiple of its
inputs, `build()`, the model card's line and the mapping from the LSM foundation model paper's
checkpoint keys (`from_paper_state`). Adding one is that module plus one line in `BACKBONES` (or a
`register_backbone` call). Entries are `module:Class` names, imported when first used, so reading a
config imports only its own architecture.

Configs with `backbone:` sections (pretraining, finetuning, model folders) are parsed through
`BackboneConfig.config_variant`: the `arch` key picks the class (default `DEFAULT_ARCH`). Files written before
there was one class per architecture hold every field of every architecture; those other
architectures' keys are dropped when they hold their old defaults.

Example:
    >>> cfg = from_dict(BackboneConfig, {"arch": "unet", "channels": [8, 16, 32], "strides": [2, 2]})
    >>> net = build_backbone(cfg)
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence

from lsmfm.errors import ConfigError
from lsmfm.registry import Registry

DEFAULT_ARCH = "unet"  # of a `backbone:` section without `arch`
BACKBONES = Registry("backbone arch", {
    "unet": "lsmfm.models.backbones.unet:UNetConfig",
    "swinunetr": "lsmfm.models.backbones.swinunetr:SwinUNETRConfig",
})
# The single flat BackboneConfig of format version 1 wrote these for every architecture.
FLAT_V1_DEFAULTS: dict[str, Any] = {"channels": [32, 64, 128, 256, 512], "strides": [2, 2, 2, 1],
                                    "num_res_units": 2, "feature_size": 24, "use_checkpoint": False}


@dataclass
class BackboneConfig:
    """Base of every architecture's config: the tag and the channel counts every backbone has.

    Args:
        arch: the architecture (a key of `BACKBONES`); each subclass fixes it.
        in_channels: image channels.
        out_channels: dense feature (and pooled embedding) dimension.
        axes: the order of the spatial axes the network was trained on: "zyx" (lsmfm's arrays) or
            "xyz" (nibabel's, as the LSM foundation model paper fed them). Inputs and outputs are
            always (z, y, x); an "xyz" network gets them transposed at its boundary.
        input_scale: the network sees its input resized by this factor (trilinear), and its dense
            output is resized back: 1 (default), or e.g. 64/96 to run a network pretrained on 96³
            patches resized to 64³ (the paper's) at its pretraining voxel scale.
    """

    arch: str = DEFAULT_ARCH
    in_channels: int = 1
    out_channels: int = 128
    axes: Literal["zyx", "xyz"] = "zyx"
    input_scale: float = 1.0

    def __post_init__(self) -> None:
        if min(self.in_channels, self.out_channels) < 1:
            raise ValueError("in_channels and out_channels must be >= 1")
        if self.axes not in ("zyx", "xyz"):
            raise ValueError(f"axes must be zyx or xyz, got {self.axes!r}")
        if not 0.0 < self.input_scale <= 8.0:
            raise ValueError(f"input_scale must be in (0, 8], got {self.input_scale}")

    @property
    def input_multiple(self) -> int:
        """Every spatial size of an input must be a multiple of this: sizes that `input_scale` maps
        exactly onto multiples of the network's `size_multiple` (64/96 and 8: multiples of 12)."""
        scale = Fraction(self.input_scale).limit_denominator(64)
        multiple = self.size_multiple * scale.denominator
        return multiple // math.gcd(scale.numerator, multiple)

    @property
    def size_multiple(self) -> int:
        """Every spatial input size must be a multiple of this."""
        raise NotImplementedError

    def size_problem(self, size: Sequence[int]) -> str | None:
        """Why a (z, y, x) input size does not suit the network, or None: sizes not divisible by
        `input_multiple`, and whatever the architecture adds (`network_size_problem`)."""
        m = self.input_multiple
        if any(int(s) % m for s in size):
            return f"must be divisible by {m} for {self.arch}"
        return self.network_size_problem([round(int(s) * self.input_scale) for s in size])

    def network_size_problem(self, size: Sequence[int]) -> str | None:
        """An architecture's own limit on the size its network sees (after `input_scale`); None: none."""
        return None

    def build(self) -> Any:
        """The network (an `lsmfm.models.backbones.base.Backbone`), freshly initialised."""
        raise NotImplementedError

    def card_line(self) -> str:
        """One line for model cards: the architecture and its arguments."""
        raise NotImplementedError

    def monai_network(self) -> tuple[str, dict[str, Any]] | None:
        """(class name in `monai.networks.nets`, its keyword arguments) when the network is exactly that
        MONAI class, so a file that imports only MONAI rebuilds it (bioimage.io packages); else None."""
        return None

    @classmethod
    def from_paper_state(cls, state: Mapping[str, Any], path: str | Path,
                         hp: Mapping[str, Any]) -> BackboneConfig | None:
        """The config of an encoder state dict from the paper's checkpoints (MONAI key names), or None
        when the keys are not this architecture's; `hp`: the checkpoint's `hyper_parameters.model`."""
        return None

    @classmethod
    def config_variant(cls, data: Any, where: str) -> tuple[type, Any]:
        """The class a `backbone:` mapping describes (by its `arch`) and the mapping to build it from."""
        if not isinstance(data, dict):
            return cls, data
        own = cls.__dataclass_fields__["arch"].default
        arch = data.get("arch", DEFAULT_ARCH) if cls is BackboneConfig else own
        if not isinstance(arch, str):
            raise ConfigError(f"{where}: arch must be a string, got {arch!r}")
        target = backbone_config_class(arch) if cls is BackboneConfig else cls
        names = {f.name for f in dataclasses.fields(target)}
        kept = {k: v for k, v in data.items() if k in names or FLAT_V1_DEFAULTS.get(k, object()) != v}
        return target, kept


def register_backbone(arch: str, target: str, replace: bool = False) -> None:
    """Add an architecture: `target` is "module:ConfigClass" (an existing `arch` needs `replace=True`)."""
    BACKBONES.register(arch, target, replace)


def backbone_config_class(arch: str) -> type[BackboneConfig]:
    """The config class of `arch`; an unknown name is a ConfigError listing the known ones."""
    cls = BACKBONES.load(arch)
    if not (isinstance(cls, type) and issubclass(cls, BackboneConfig)):
        raise TypeError(f"{BACKBONES[arch]} is not a BackboneConfig subclass")
    return cls


def default_backbone_config() -> BackboneConfig:
    """The default architecture with its defaults (the paper's UNet)."""
    return backbone_config_class(DEFAULT_ARCH)()


def build_backbone(config: BackboneConfig) -> Any:
    """Construct the backbone `config` describes (its architecture's `build()`)."""
    return config.build()
