"""3D structural similarity (Wang et al. 2004) with a Gaussian window, differentiable, and its loss.

Local means, variances and covariance are Gaussian-weighted averages (separable 3D convolution, sigma
1.5, 11 taps by default: the window scikit-image uses with `gaussian_weights=True`). Only windows that
lie fully inside the volume are averaged ("valid" convolution), which equals scikit-image's cropping of
the border, so `ssim` matches `skimage.metrics.structural_similarity(..., gaussian_weights=True,
sigma=1.5, use_sample_covariance=False, data_range=R)` on 3D volumes.

Example:
    >>> loss = SSIMLoss(data_range=1.0)
    >>> pred = torch.rand(2, 1, 32, 32, 32, requires_grad=True)
    >>> loss(pred, torch.rand(2, 1, 32, 32, 32)).backward()
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def gaussian_window(size: int = 11, sigma: float = 1.5, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Normalised 1D Gaussian of odd length `size`."""
    if size < 1 or size % 2 == 0:
        raise ValueError(f"SSIM window size must be a positive odd number, got {size}")
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    w = torch.exp(-(x ** 2) / (2 * sigma ** 2))
    return (w / w.sum()).to(dtype)


def _filter(x: torch.Tensor, window: torch.Tensor) -> torch.Tensor:
    """Valid separable Gaussian filtering of (B, C, D, H, W), each channel on its own."""
    c = x.shape[1]
    k = window.numel()
    for axis in range(3):
        shape = [1, 1, 1, 1, 1]
        shape[2 + axis] = k
        x = F.conv3d(x, window.view(shape).expand(c, 1, *shape[2:]).contiguous(), groups=c)
    return x


def ssim(x: torch.Tensor, y: torch.Tensor, data_range: float, window_size: int = 11, sigma: float = 1.5,
         k1: float = 0.01, k2: float = 0.03) -> torch.Tensor:
    """Mean SSIM per batch item of (B, C, D, H, W) volumes: a (B,) tensor, 1 for identical inputs.

    Args:
        data_range: max - min of the intensity scale (1.0 for images normalised to [0, 1]); it sets the
            stabilising constants C1 = (k1 R)^2, C2 = (k2 R)^2, so it must be the same for all compared pairs.
        window_size, sigma: Gaussian window (odd size; 7 or 11 taps for sigma 1.5).
    """
    if x.shape != y.shape or x.ndim != 5:
        raise ValueError(f"ssim expects two (B, C, D, H, W) tensors of the same shape, got {tuple(x.shape)} "
                         f"and {tuple(y.shape)}")
    if min(x.shape[2:]) < window_size:
        raise ValueError(f"ssim window of {window_size} voxels does not fit a volume of {tuple(x.shape[2:])}")
    if data_range <= 0:
        raise ValueError(f"ssim data_range must be > 0, got {data_range}")
    window = gaussian_window(window_size, sigma, x.dtype).to(x.device)
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    mu_x, mu_y = _filter(x, window), _filter(y, window)
    var_x = _filter(x * x, window) - mu_x ** 2
    var_y = _filter(y * y, window) - mu_y ** 2
    cov = _filter(x * y, window) - mu_x * mu_y
    num = (2 * mu_x * mu_y + c1) * (2 * cov + c2)
    den = (mu_x ** 2 + mu_y ** 2 + c1) * (var_x + var_y + c2)
    return (num / den).flatten(1).mean(dim=1)


class SSIMLoss(nn.Module):
    """1 - SSIM averaged over the batch; see `ssim` for the arguments."""

    def __init__(self, data_range: float = 1.0, window_size: int = 11, sigma: float = 1.5) -> None:
        super().__init__()
        self.data_range = float(data_range)
        self.window_size = int(window_size)
        self.sigma = float(sigma)

    def forward(self, prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return 1.0 - ssim(prediction, target, self.data_range, self.window_size, self.sigma).mean()
