"""3D augmentations of streamed patches (MONAI transforms, torch noise), seeded per sample.

Light-sheet volumes have a distinct axial (z) direction: flips are allowed on every axis, but 90°
rotations stay in the (y, x) plane so the anisotropic PSF keeps its orientation.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch


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


class Augmenter:
    """Applies the configured transforms to a (C, D, H, W) tensor with a per-sample seed."""

    def __init__(self, cfg: AugmentConfig) -> None:
        self.transform = _compose(cfg) if cfg.enabled else None  # MONAI is imported only when needed
        self.noise_prob, self.noise_std = cfg.noise_prob, cfg.noise_std

    def __call__(self, x: torch.Tensor, seed: int) -> torch.Tensor:
        if self.transform is None:
            return x
        self.transform.set_random_state(seed=seed)
        with _plain_tensors():
            out = self.transform(x)
        return _gaussian_noise(out.float(), self.noise_prob, self.noise_std, seed)


def _compose(cfg: AugmentConfig) -> Any:
    import lsmfm._monai  # noqa: F401  (MONAI without transformers)
    from monai.transforms import (Compose, RandAdjustContrast, RandFlip, RandRotate90, RandScaleIntensity,
                                  RandShiftIntensity)

    steps = [RandFlip(prob=cfg.flip_prob, spatial_axis=axis) for axis in range(3)]
    steps += [
        RandRotate90(prob=cfg.rot90_prob, max_k=3, spatial_axes=(1, 2)),
        RandScaleIntensity(factors=cfg.scale, prob=cfg.scale_prob),
        RandShiftIntensity(offsets=cfg.shift, prob=cfg.shift_prob),
        RandAdjustContrast(prob=cfg.gamma_prob, gamma=tuple(cfg.gamma)),
    ]
    return Compose(steps)


def _gaussian_noise(x: torch.Tensor, prob: float, max_std: float, seed: int) -> torch.Tensor:
    """Additive noise with std ~ U(0, max_std), as MONAI's RandGaussianNoise, but drawn by torch's generator:
    MONAI draws it with numpy's legacy RandomState, which costs more than reading the patch."""
    gen = torch.Generator().manual_seed(seed)
    draw = torch.rand(2, generator=gen)
    if prob <= 0 or draw[0] >= prob:
        return x
    return x + torch.randn(x.shape, generator=gen) * (float(draw[1]) * max_std)


@contextlib.contextmanager
def _plain_tensors() -> Iterator[None]:
    """Run MONAI without MetaTensor bookkeeping (2-3x faster here), restoring the global setting after."""
    import lsmfm._monai  # noqa: F401  (MONAI without transformers)
    from monai.data import get_track_meta, set_track_meta

    previous = get_track_meta()
    set_track_meta(False)
    try:
        yield
    finally:
        set_track_meta(previous)
