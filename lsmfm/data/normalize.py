"""Intensity normalisation shared by pretraining, finetuning and prediction (recorded with each model)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class NormalizeConfig:
    """Percentile scaling to [0, 1]: (x - p_lower) / (p_upper - p_lower), clipped when `clip`."""

    lower: float = 0.5
    upper: float = 99.5
    clip: bool = True

    def __post_init__(self) -> None:
        if not 0.0 <= self.lower < self.upper <= 100.0:
            raise ValueError(f"normalize percentiles must satisfy 0 <= lower < upper <= 100, got "
                             f"{self.lower}, {self.upper}")


def percentile_normalize(x: np.ndarray | torch.Tensor, cfg: NormalizeConfig = NormalizeConfig(),
                         bounds: tuple[float, float] | None = None, inplace: bool = False
                         ) -> np.ndarray | torch.Tensor:
    """Scale `x` to [0, 1] by its own percentiles, or by precomputed `bounds` (lo, hi) when given.

    `inplace=True` overwrites a float32 NumPy array instead of allocating: on the streaming hot path a
    copy costs about as much as decoding the patch.
    """
    if bounds is None:
        if isinstance(x, torch.Tensor):
            flat = x.detach().float().flatten()
            q = torch.tensor([cfg.lower / 100, cfg.upper / 100], dtype=flat.dtype, device=flat.device)
            lo, hi = (float(v) for v in torch.quantile(flat, q))
        else:
            lo, hi = (float(v) for v in np.percentile(x, [cfg.lower, cfg.upper]))
    else:
        lo, hi = bounds
    scale = 1.0 / max(hi - lo, 1e-6)
    if isinstance(x, torch.Tensor):
        y = (x.float() - lo) * scale
        return y.clamp_(0.0, 1.0) if cfg.clip else y
    if inplace and not (isinstance(x, np.ndarray) and x.dtype == np.float32):
        raise TypeError("inplace normalisation needs a float32 NumPy array")
    y = x if inplace else np.array(x, dtype=np.float32)
    y -= np.float32(lo)
    y *= np.float32(scale)
    return np.clip(y, 0.0, 1.0, out=y) if cfg.clip else y


def normalize_channels(image: np.ndarray, cfg: NormalizeConfig = NormalizeConfig(),
                       bounds: list[tuple[float, float]] | None = None) -> np.ndarray:
    """Normalise each channel of a (C, Z, Y, X) image on its own (or by its `bounds[c]`), as float32,
    in the output array: no temporary as large as the image (prediction passes blocks of ~100 MiB)."""
    out = np.empty(image.shape, dtype=np.float32)
    for c, channel in enumerate(image):
        lo_hi = bounds[c] if bounds is not None else np.percentile(channel, [cfg.lower, cfg.upper])
        out[c] = channel
        percentile_normalize(out[c], cfg, (float(lo_hi[0]), float(lo_hi[1])), inplace=True)
    return out


def denormalize_channels(image: np.ndarray, bounds: list[tuple[float, float]]) -> np.ndarray:
    """Map a normalised float (C, Z, Y, X) image back to intensity units by its `bounds[c]`, in place
    (deblurring outputs, per patch and per prediction block); returns `image`."""
    for channel, (lo, hi) in zip(image, bounds):
        channel *= hi - lo
        channel += lo
    return image
