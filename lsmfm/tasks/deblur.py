"""Deblurring: predict the sharp image from the blurred one as a residual; L1 + SSIM loss; PSNR and 3D SSIM.

Pairs come from `<stem>_blurred` files or are made from the sharp image with an anisotropic Gaussian PSF
(light-sheet-like: widest along z) and Poisson-Gaussian noise, once per image with a seed from its name.
Input and target are scaled by the blurred image's percentile bounds (known at inference), so the
output lives in the input's [0, 1] range; metrics use data range 1. The blurred input scored against the
target (`psnr_input`, `ssim_input`) is the baseline a model must beat.
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping

import numpy as np
import torch
from torch import nn

from lsmfm.data.normalize import NormalizeConfig, denormalize_channels, normalize_channels
from lsmfm.tasks.base import BioimageioOutput, Example, FinetuneTask, Scores, sliding_window
from lsmfm.tasks.config import DataConfig, FinetuneConfig
from lsmfm.tasks.data import Patch, load_split
from lsmfm.tasks.outputs import write_prediction


@dataclass
class DeblurConfig:
    """Residual deblurring, L1 + SSIM loss.

    Args:
        pairs: "files" reads `<stem>_blurred` next to each image; "synthetic" blurs the sharp image with
            an anisotropic Gaussian PSF (`psf_sigma` in voxels, z y x: light-sheet-like, longest along z)
            and adds Poisson-Gaussian noise (`photons` expected at the 99.5th percentile intensity, read
            noise `read_noise` as a fraction of it), once per image with a seed from its file name.
    """

    pairs: Literal["files", "synthetic"] = "files"
    psf_sigma: list[float] = field(default_factory=lambda: [2.5, 1.0, 1.0])
    photons: float = 200.0
    read_noise: float = 0.01
    l1_weight: float = 1.0
    ssim_weight: float = 0.5

    def __post_init__(self) -> None:
        if len(self.psf_sigma) != 3 or min(self.psf_sigma) < 0:
            raise ValueError(f"deblur.psf_sigma must be three non-negative sigmas (z, y, x), got "
                             f"{self.psf_sigma}")
        if self.photons <= 0 or self.read_noise < 0:
            raise ValueError("deblur.photons must be > 0 and deblur.read_noise >= 0")
        if min(self.l1_weight, self.ssim_weight) < 0 or self.l1_weight + self.ssim_weight <= 0:
            raise ValueError("deblur.l1_weight and deblur.ssim_weight must be >= 0 with a positive sum")


@dataclass
class DeblurFinetuneConfig(FinetuneConfig):
    deblur: DeblurConfig = field(default_factory=DeblurConfig)


@dataclass
class DeblurHeadConfig:
    """A 1x1x1 conv from the dense features to the image channels, zero-initialised; `residual`: its
    output is added to the input (an untrained model returns its input)."""

    residual: bool = True


def degrade(image: np.ndarray, cfg: DeblurConfig, seed: int) -> np.ndarray:
    """Blur a (C, Z, Y, X) image with the configured PSF and add Poisson-Gaussian noise, in its own units.

    Intensities are counted in units of the channel's 99.5th percentile: `photons` expected photons at
    that level (shot noise), plus Gaussian read noise of standard deviation `read_noise` in those units.
    """
    from scipy.ndimage import gaussian_filter

    rng = np.random.default_rng(seed)
    out = np.empty(image.shape, dtype=np.float32)
    for i, channel in enumerate(image):
        level = max(float(np.percentile(channel, 99.5)), 1e-6)
        blurred = gaussian_filter(channel / level, sigma=cfg.psf_sigma, mode="reflect")
        counts = rng.poisson(np.clip(blurred, 0.0, None) * cfg.photons) / cfg.photons
        out[i] = (counts + rng.normal(0.0, cfg.read_noise, blurred.shape)) * level
    return out


def channel_bounds(image: np.ndarray, cfg: NormalizeConfig) -> list[tuple[float, float]]:
    """Per-channel (lower, upper) percentiles of a (C, Z, Y, X) image."""
    return [tuple(float(v) for v in np.percentile(c, [cfg.lower, cfg.upper])) for c in image]  # type: ignore[misc]


class DeblurTask(FinetuneTask):
    name = "deblur"
    summary = "residual deblurring (L1 + SSIM)"
    config_class = DeblurFinetuneConfig
    head_class = DeblurHeadConfig
    metrics = ("psnr", "ssim", "psnr_input", "ssim_input")
    val_metric = "psnr"
    volume_output = "image"

    def __init__(self, cfg: DeblurConfig) -> None:
        from lsmfm.losses.ssim import SSIMLoss

        super().__init__(cfg)
        self.ssim_loss = SSIMLoss()

    def load_split(self, data: DataConfig, split: str) -> list[Patch]:
        patches = load_split(data, split, blurred=self.cfg.pairs == "files")
        if self.cfg.pairs == "synthetic":
            for p in patches:
                p.blurred = degrade(p.image, self.cfg, zlib.crc32(p.stem.encode()))
        return patches

    @classmethod
    def build_head(cls, feature_dim: int, in_channels: int, head: DeblurHeadConfig) -> nn.Module:
        conv = nn.Conv3d(feature_dim, in_channels, kernel_size=1)
        nn.init.zeros_(conv.weight)
        nn.init.zeros_(conv.bias)
        return conv

    @classmethod
    def bioimageio_output(cls, task: Mapping[str, Any], head_cfg: DeblurHeadConfig, in_channels: int
                          ) -> BioimageioOutput:
        return BioimageioOutput("restored", "restored image on the input's normalised scale (its percentile "
                                "bounds at 0 and 1)", tuple(f"channel{c}" for c in range(in_channels)),
                                residual=head_cfg.residual, tags=("deblurring", "image-restoration"))

    @classmethod
    def forward(cls, backbone: nn.Module, head: nn.Module, head_cfg: DeblurHeadConfig, x: torch.Tensor
                ) -> torch.Tensor:
        out = head(backbone(x))
        return x + out if head_cfg.residual else out

    def head_config(self) -> DeblurHeadConfig:
        return DeblurHeadConfig(residual=True)

    def prepare(self, patch: Patch, normalize: NormalizeConfig) -> Example:
        assert patch.blurred is not None
        bounds = channel_bounds(patch.blurred, normalize)
        return Example(patch, normalize_channels(patch.blurred, normalize, bounds),
                       normalize_channels(patch.image, normalize, bounds), bounds=bounds)

    def loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        l1 = torch.nn.functional.l1_loss(output, target)
        return self.cfg.l1_weight * l1 + self.cfg.ssim_weight * self.ssim_loss(output, target)

    def score(self, model: nn.Module, examples: list[Example], roi: tuple[int, int, int], overlap: float
              ) -> Scores:
        from lsmfm.metrics.restoration import psnr, ssim3d

        per_image, outputs = [], []
        for ex in examples:
            out = sliding_window(model, ex.input, roi, overlap).numpy().clip(0.0, 1.0)
            target = np.asarray(ex.target)
            per_image.append({"stem": ex.patch.stem,
                              "psnr": psnr(out, target, data_range=1.0),
                              "ssim": ssim3d(out, target, data_range=1.0),
                              "psnr_input": psnr(ex.input, target, data_range=1.0),
                              "ssim_input": ssim3d(ex.input, target, data_range=1.0)})
            outputs.append(out)
        metrics = {m: float(np.mean([r[m] for r in per_image])) for m in self.metrics}
        return Scores(metrics, per_image, outputs)

    def write_predictions(self, scores: Scores, examples: list[Example], out_dir: Path, fmt: str) -> None:
        """The deblurred images in the input's intensity units (float32)."""
        for out, ex in zip(scores.predictions, examples):
            assert ex.bounds is not None
            raw = denormalize_channels(np.array(out, dtype=np.float32), ex.bounds)
            write_prediction(raw[0] if len(raw) == 1 else raw, ex.patch, out_dir, "deblurred", fmt)
