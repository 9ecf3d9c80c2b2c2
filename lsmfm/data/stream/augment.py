"""3D augmentations of streamed patches (MONAI transforms, torch noise), seeded per sample.

Light-sheet volumes have a distinct axial (z) direction: flips are allowed on every axis, but 90°
rotations stay in the (y, x) plane so the anisotropic PSF keeps its orientation.
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch

from lsmfm.data.stream.config import AugmentConfig


class Augmenter:
    """Applies the configured transforms to a (C, D, H, W) tensor with a per-sample seed."""

    def __init__(self, cfg: AugmentConfig) -> None:
        self.transform = _compose(cfg) if cfg.enabled else None  # MONAI is imported only when needed
        self.smooth = _smooth(cfg) if cfg.enabled and cfg.smooth_prob > 0 else None
        self.noise_prob, self.noise_std, self.clip = cfg.noise_prob, cfg.noise_std, cfg.clip

    def __call__(self, x: torch.Tensor, seed: int) -> torch.Tensor:
        if self.transform is None:
            return x
        self.transform.set_random_state(seed=seed)
        with _plain_tensors():
            out = self.transform(x)
        out = _gaussian_noise(out.float(), self.noise_prob, self.noise_std, seed)
        if self.smooth is not None:
            self.smooth.set_random_state(seed=seed + 1)
            with _plain_tensors():
                out = self.smooth(out).float()
        return out.clamp_(0.0, 1.0) if self.clip else out


def _compose(cfg: AugmentConfig) -> Any:
    """The MONAI part before the noise. A transform that is off by default joins the list only when it is
    on, so the default list, and with it every transform's seed, stays as it was."""
    import lsmfm._monai  # noqa: F401  (MONAI without transformers)
    from monai.transforms import (Compose, RandAdjustContrast, RandAffine, RandFlip, RandRotate90,
                                  RandScaleIntensity, RandShiftIntensity)

    if cfg.flip_axes == "all":
        steps = [RandFlip(prob=cfg.flip_prob, spatial_axis=(0, 1, 2))]
    else:
        steps = [RandFlip(prob=cfg.flip_prob, spatial_axis=axis) for axis in range(3)]
    steps.append(RandRotate90(prob=cfg.rot90_prob, max_k=3, spatial_axes=(1, 2)))
    if cfg.affine_prob > 0:
        steps.append(RandAffine(prob=cfg.affine_prob, rotate_range=(cfg.affine_rotate,) * 3,
                                scale_range=(cfg.affine_scale,) * 3, mode="bilinear",
                                padding_mode="reflection"))
    steps += [
        RandScaleIntensity(factors=cfg.scale, prob=cfg.scale_prob),
        RandShiftIntensity(offsets=cfg.shift, prob=cfg.shift_prob),
        RandAdjustContrast(prob=cfg.gamma_prob, gamma=tuple(cfg.gamma)),
    ]
    return Compose(steps)


def _smooth(cfg: AugmentConfig) -> Any:
    """Gaussian smoothing after the noise (as the paper smooths its noise), sigma drawn per axis."""
    import lsmfm._monai  # noqa: F401  (MONAI without transformers)
    from monai.transforms import RandGaussianSmooth

    sigma = tuple(cfg.smooth_sigma)
    return RandGaussianSmooth(sigma_x=sigma, sigma_y=sigma, sigma_z=sigma, prob=cfg.smooth_prob)


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
