"""Image formation of the synthetic light-sheet microscope: excitation, detection blur and camera noise.

The emitted light is the scene times the excitation (a sheet entering along x that weakens with depth,
smooth unevenness, and the stripe shadows cast by absorbing objects), blurred by an anisotropic
Gaussian PSF (worst along z, the detection axis), then photon-counted (Poisson) and read out by a
camera (gain, offset, Gaussian read noise) into uint16.
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage

from lsmfm.data.synthetic.scene import smooth_noise


def illumination(shape: tuple[int, int, int], falloff: float, rng: np.random.Generator) -> np.ndarray:
    """Excitation along x: exponential loss of `falloff` across the field, times smooth 15 % unevenness."""
    z, y, x = shape
    depth = np.exp(np.log1p(-falloff) * np.arange(x) / max(x - 1, 1)).astype(np.float32)
    curves = [smooth_noise((n,), max(n / 4, 1.0), rng) * 0.05 for n in shape]
    uneven = 1.0 + curves[0][:, None, None] + curves[1][None, :, None] + curves[2][None, None, :]
    return (uneven * depth[None, None, :]).astype(np.float32)


def stripe_shadows(shape: tuple[int, int, int], voxel: tuple[float, float, float], count: int,
                   strength: tuple[float, float], rng: np.random.Generator) -> np.ndarray:
    """Multiplicative shadows along x: each absorber at x0 dims a Gaussian (z, y) spot for all x >= x0."""
    z, y, x = shape
    log_step = np.zeros(shape, np.float32)
    for _ in range(count):
        z0, y0 = rng.uniform(0, z * voxel[0]), rng.uniform(0, y * voxel[1])
        sz, sy = rng.uniform(3.0, 10.0), rng.uniform(1.0, 4.0)
        zs = np.arange(max(0, int((z0 - 4 * sz) / voxel[0])), min(z, int((z0 + 4 * sz) / voxel[0]) + 1))
        ys = np.arange(max(0, int((y0 - 4 * sy) / voxel[1])), min(y, int((y0 + 4 * sy) / voxel[1]) + 1))
        dz, dy = (zs[:, None] * voxel[0] - z0) / sz, (ys[None, :] * voxel[1] - y0) / sy
        spot = np.exp(-0.5 * (dz ** 2 + dy ** 2))
        x0 = int(rng.integers(0, max(x // 2, 1)))
        loss = np.log1p(-rng.uniform(*strength) * spot).astype(np.float32)
        log_step[zs[0]:zs[-1] + 1, ys[0]:ys[-1] + 1, x0] += loss  # the spot's centre is inside the volume
    return np.exp(np.cumsum(log_step, axis=2))


def psf_blur(emission: np.ndarray, psf_sigma_um: tuple[float, float, float],
             voxel: tuple[float, float, float]) -> np.ndarray:
    """Anisotropic Gaussian detection PSF; sigmas in µm are converted to voxels per axis."""
    sigma = [s / v for s, v in zip(psf_sigma_um, voxel)]
    return ndimage.gaussian_filter(emission, sigma, mode="nearest").astype(np.float32)


def to_adu(photons: np.ndarray, gain: float, offset: float) -> np.ndarray:
    """Expected camera counts (ADU) for a given expected photon count."""
    return (offset + gain * photons).astype(np.float32)


def camera(expected_photons: np.ndarray, gain: float, offset: float, read_noise: float,
           rng: np.random.Generator) -> np.ndarray:
    """Poisson shot noise, gain and offset, Gaussian read noise, rounded and clipped to uint16."""
    counts = rng.poisson(np.maximum(expected_photons, 0.0)).astype(np.float32)
    adu = to_adu(counts, gain, offset) + rng.normal(0.0, read_noise, counts.shape).astype(np.float32)
    return np.clip(np.rint(adu), 0, np.iinfo(np.uint16).max).astype(np.uint16)
