"""Deblurring: predict the sharp image from the blurred one as a residual; L1 + SSIM loss; PSNR and 3D SSIM.

Pairs come from `<stem>_blurred` files or are made from the sharp image with an anisotropic Gaussian PSF
(light-sheet-like: widest along z) and Poisson-Gaussian noise, once per image with a seed from its name.
Input and target are scaled by the blurred image's percentile bounds (known at inference), so the
output lives in the input's [0, 1] range; metrics use data range 1. The blurred input scored against the
target (`psnr_input`, `ssim_input`) is the baseline a model must beat.
"""
from __future__ import annotations

import zlib
from pathlib import Path

import numpy as np
import torch
from torch import nn

from lsmfm.data.normalize import NormalizeConfig, denormalize_channels, normalize_channels
from lsmfm.tasks.base import Example, FinetuneTask, Scores, sliding_window
from lsmfm.tasks.config import DataConfig, DeblurConfig
from lsmfm.tasks.data import Patch, load_split
from lsmfm.tasks.models import HeadConfig
from lsmfm.tasks.outputs import write_prediction


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
    metrics = ("psnr", "ssim", "psnr_input", "ssim_input")
    val_metric = "psnr"

    def __init__(self, cfg: DeblurConfig) -> None:
        from lsmfm.losses.ssim import SSIMLoss

        self.cfg = cfg
        self.ssim_loss = SSIMLoss()

    def load_split(self, data: DataConfig, split: str) -> list[Patch]:
        patches = load_split(data, split, blurred=self.cfg.pairs == "files")
        if self.cfg.pairs == "synthetic":
            for p in patches:
                p.blurred = degrade(p.image, self.cfg, zlib.crc32(p.stem.encode()))
        return patches

    def head_config(self) -> HeadConfig:
        return HeadConfig(residual=True)

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
