"""Restoration metrics (deblurring): PSNR and 3D SSIM with a fixed data range, so scores of different
images and of the blurred input itself are comparable."""
from __future__ import annotations

import math

import numpy as np


def psnr(pred: np.ndarray, target: np.ndarray, data_range: float) -> float:
    """Peak signal-to-noise ratio in dB, 10 log10(R² / MSE); `inf` for identical inputs (as scikit-image).

    `data_range` R must be fixed by the caller (1.0 on normalised images), never taken from the data, so
    scores of different images and of the blurred baseline are comparable.
    """
    p, t = np.asarray(pred, dtype=np.float64), np.asarray(target, dtype=np.float64)
    if p.shape != t.shape:
        raise ValueError(f"prediction shape {p.shape} differs from target shape {t.shape}")
    if data_range <= 0:
        raise ValueError(f"data_range must be > 0, got {data_range}")
    mse = float(np.mean((p - t) ** 2))
    if mse == 0.0:
        return math.inf
    return 10.0 * math.log10(data_range ** 2 / mse)


def ssim3d(pred: np.ndarray, target: np.ndarray, data_range: float, window_size: int = 11,
           sigma: float = 1.5) -> float:
    """Mean 3D SSIM of two (Z, Y, X) or (C, Z, Y, X) volumes, Gaussian window (see lsmfm.losses.ssim);
    equals scikit-image's with gaussian_weights=True, use_sample_covariance=False."""
    import torch

    from lsmfm.losses.ssim import ssim

    p, t = np.asarray(pred, dtype=np.float64), np.asarray(target, dtype=np.float64)
    if p.shape != t.shape or p.ndim not in (3, 4):
        raise ValueError(f"ssim3d expects two (Z, Y, X) or (C, Z, Y, X) volumes of the same shape, got "
                         f"{p.shape} and {t.shape}")
    if p.ndim == 3:
        p, t = p[None], t[None]
    x, y = torch.from_numpy(p)[None], torch.from_numpy(t)[None]
    return float(ssim(x, y, data_range, window_size, sigma).item())
