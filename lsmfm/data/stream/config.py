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
    """Probabilities and ranges of each augmentation; a probability of 0 disables that transform.

    Order: flips, rot90, affine, intensity scale, shift, gamma, noise, smoothing, then the optional clip.
    The paper's set (00-helpers/all_datasets_transforms.py) is flips of all axes at once, rot90, a small
    affine, noise, smoothing, scale and shift, each p = 0.2, then a clamp to [0, 1].
    """

    enabled: bool = True
    flip_prob: float = 0.5  # per axis (z, y, x), or for all three at once with flip_axes: all
    flip_axes: Literal["each", "all"] = "each"  # each axis its own draw, or one draw flips all three
    rot90_prob: float = 0.5  # k * 90° in the (y, x) plane, k in 1..3; needs a square (y, x) patch
    affine_prob: float = 0.0  # MONAI RandAffine: bilinear, reflection padding
    affine_rotate: float = 0.1  # rotation about each axis, U(-0.1, 0.1) radians
    affine_scale: float = 0.1  # zoom of each axis, 1 + U(-0.1, 0.1)
    scale_prob: float = 0.2
    scale: float = 0.1  # intensity multiplied by 1 + U(-scale, scale)
    shift_prob: float = 0.2
    shift: float = 0.1  # intensity offset U(-shift, shift), in normalised units
    gamma_prob: float = 0.2
    gamma: list[float] = field(default_factory=lambda: [0.7, 1.5])
    noise_prob: float = 0.2
    noise_std: float = 0.05  # std of additive Gaussian noise drawn from U(0, noise_std)
    smooth_prob: float = 0.0  # MONAI RandGaussianSmooth, after the noise
    smooth_sigma: list[float] = field(default_factory=lambda: [0.25, 1.5])  # voxels, drawn per axis
    clip: bool = False  # clamp to [0, 1] after augmentation (the paper's ClampIntensityd)

    def __post_init__(self) -> None:
        for name in ("flip_prob", "rot90_prob", "affine_prob", "scale_prob", "shift_prob", "gamma_prob",
                     "noise_prob", "smooth_prob"):
            p = getattr(self, name)
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"augment.{name} must be in [0, 1], got {p}")
        for name in ("affine_rotate", "affine_scale", "scale", "shift", "noise_std"):
            if getattr(self, name) < 0:
                raise ValueError(f"augment.{name} must be >= 0, got {getattr(self, name)}")
        if self.affine_scale >= 1:
            raise ValueError(f"augment.affine_scale must be below 1 (a zoom of 1 + U(-s, s)), "
                             f"got {self.affine_scale}")
        if len(self.gamma) != 2 or not 0 < self.gamma[0] <= self.gamma[1]:
            raise ValueError(f"augment.gamma must be [low, high] with 0 < low <= high, got {self.gamma}")
        if len(self.smooth_sigma) != 2 or not 0 < self.smooth_sigma[0] <= self.smooth_sigma[1]:
            raise ValueError(f"augment.smooth_sigma must be [low, high] voxels with 0 < low <= high, "
                             f"got {self.smooth_sigma}")


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
    read_size: list[int] | None = None  # voxels (z, y, x) read per patch, resampled to patch_size
    resize: Literal["area", "trilinear"] = "area"  # how a read region is resampled to patch_size
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
        if self.read_size is not None:
            if len(self.read_size) != 3 or min(self.read_size) < 1:
                raise ValueError(f"read_size must be 3 positive integers (z, y, x), got {self.read_size}")
            if self.target_voxel_size is not None:
                raise ValueError("set read_size or target_voxel_size, not both: each decides the region read")
        if self.level < 0:
            raise ValueError(f"level must be >= 0, got {self.level}")
        if self.augment.enabled and self.augment.rot90_prob > 0 and self.patch_size[1] != self.patch_size[2]:
            raise ValueError(f"augment.rot90_prob > 0 needs a square (y, x) patch, got {self.patch_size}; "
                             "set augment.rot90_prob=0")
