"""Every config of the patch stream in one place: `StreamConfig` (the `data:` section of a pretraining
recipe) and its sections, foreground sampling, normalisation, augmentation and text choice."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from lsmfm.data.normalize import NormalizeConfig


@dataclass
class ForegroundConfig:
    """Foreground-aware sampling: reject patch positions whose region is near-empty background.

    A coarse-level voxel counts as foreground when it exceeds `lower + threshold * (upper - lower)`,
    where lower/upper are the store's intensity percentiles (the normalisation bounds). A position is
    accepted when at least `min_fraction` of its coarse-level region is foreground; after `max_tries`
    rejections the best position seen is used, so sparse volumes still stream.
    """

    enabled: bool = True
    level: int = -1  # pyramid level of the foreground map; negative counts from the coarsest
    threshold: float = 0.2
    min_fraction: float = 0.05
    max_tries: int = 10

    def __post_init__(self) -> None:
        if not 0.0 <= self.min_fraction <= 1.0:
            raise ValueError(f"foreground.min_fraction must be in [0, 1], got {self.min_fraction}")
        if self.max_tries < 1:
            raise ValueError(f"foreground.max_tries must be >= 1, got {self.max_tries}")


@dataclass
class AugmentConfig:
    """Probabilities and ranges of each augmentation; a probability of 0 disables that transform."""

    enabled: bool = True
    flip_prob: float = 0.5  # per axis (z, y, x)
    rot90_prob: float = 0.5  # k * 90° in the (y, x) plane, k in 1..3; needs a square (y, x) patch
    scale_prob: float = 0.2
    scale: float = 0.1  # intensity multiplied by 1 + U(-scale, scale)
    shift_prob: float = 0.2
    shift: float = 0.1  # intensity offset U(-shift, shift), in normalised units
    gamma_prob: float = 0.2
    gamma: list[float] = field(default_factory=lambda: [0.7, 1.5])
    noise_prob: float = 0.2
    noise_std: float = 0.05  # std of additive Gaussian noise drawn from U(0, noise_std)

    def __post_init__(self) -> None:
        for name in ("flip_prob", "rot90_prob", "scale_prob", "shift_prob", "gamma_prob", "noise_prob"):
            p = getattr(self, name)
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"augment.{name} must be in [0, 1], got {p}")
        for name in ("scale", "shift", "noise_std"):
            if getattr(self, name) < 0:
                raise ValueError(f"augment.{name} must be >= 0, got {getattr(self, name)}")
        if len(self.gamma) != 2 or not 0 < self.gamma[0] <= self.gamma[1]:
            raise ValueError(f"augment.gamma must be [low, high] with 0 < low <= high, got {self.gamma}")


@dataclass(frozen=True)
class StreamNormalizeConfig(NormalizeConfig):
    """Percentile normalisation; `source: store` uses the percentiles computed at ingest (fast, and the
    same scale for every patch of a volume), `patch` computes them on each patch."""

    source: Literal["store", "patch"] = "store"


@dataclass
class StreamTextConfig:
    """Which of an entry's descriptions goes with a patch: a seeded random one per sample, or the first."""

    choice: Literal["random", "first"] = "random"


@dataclass
class StreamConfig:
    """What to stream: catalogs, patch geometry, foreground sampling, normalisation, augmentation, text."""

    catalogs: list[str] = field(default_factory=list)
    patch_size: list[int] = field(default_factory=lambda: [96, 96, 96])
    target_voxel_size: list[float] | None = None  # µm (z, y, x); patches are resampled to it
    level: int = 0  # finest pyramid level to read; with target_voxel_size a coarser one is used when it fits
    foreground: ForegroundConfig = field(default_factory=ForegroundConfig)
    normalize: StreamNormalizeConfig = field(default_factory=StreamNormalizeConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    text: StreamTextConfig = field(default_factory=StreamTextConfig)

    def __post_init__(self) -> None:
        if len(self.patch_size) != 3 or min(self.patch_size) < 1:
            raise ValueError(f"patch_size must be 3 positive integers (z, y, x), got {self.patch_size}")
        if self.target_voxel_size is not None and (len(self.target_voxel_size) != 3
                                                   or min(self.target_voxel_size) <= 0):
            raise ValueError(f"target_voxel_size must be 3 positive numbers in µm, "
                             f"got {self.target_voxel_size}")
        if self.level < 0:
            raise ValueError(f"level must be >= 0, got {self.level}")
        if self.augment.enabled and self.augment.rot90_prob > 0 and self.patch_size[1] != self.patch_size[2]:
            raise ValueError(f"augment.rot90_prob > 0 needs a square (y, x) patch, got {self.patch_size}; "
                             "set augment.rot90_prob=0")
