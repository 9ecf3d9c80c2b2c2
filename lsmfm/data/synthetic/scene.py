"""Geometry of the synthetic tissue: nuclei, vessel trees and amyloid plaques drawn in physical units (µm).

Each `draw_*` function returns one structure's float32 intensity layer (maximum where its objects
overlap) and its binary mask; `generate_volume` composes the layers. Sizes are in micrometres, so the
same tissue looks right at any voxel size, including anisotropic light-sheet voxels. Work is done per
object inside a small bounding box (nuclei, plaques) or per batch of vessel centreline points, so the
cost follows the amount of tissue drawn.
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage

Vec3 = tuple[float, float, float]


def smooth_noise(shape: tuple[int, ...], sigma_vox: float, rng: np.random.Generator) -> np.ndarray:
    """Zero-mean, unit-std Gaussian-smoothed noise; coarse fields are made at low resolution and upsampled."""
    factor = max(1, int(sigma_vox // 2))
    small = tuple(max(2, -(-s // factor)) for s in shape)
    field = ndimage.gaussian_filter(rng.standard_normal(small).astype(np.float32), sigma_vox / factor,
                                    mode="wrap")
    if small != tuple(shape):
        field = ndimage.zoom(field, [s / m for s, m in zip(shape, small)], order=1, grid_mode=True,
                             mode="grid-wrap")[tuple(slice(0, s) for s in shape)]
    field -= field.mean()
    return field / max(float(field.std()), 1e-6)


def _box(centre: np.ndarray, radius: float, voxel: np.ndarray, shape: tuple[int, ...]
         ) -> tuple[tuple[slice, ...], list[np.ndarray]] | None:
    """Slices of the voxels within `radius` µm of `centre` and their µm offsets per axis."""
    lo = np.maximum(np.floor((centre - radius) / voxel).astype(int), 0)
    hi = np.minimum(np.ceil((centre + radius) / voxel).astype(int) + 1, shape)
    if np.any(hi <= lo):
        return None
    offsets = []
    for axis in range(3):
        off = np.arange(lo[axis], hi[axis]) * voxel[axis] - centre[axis]
        view = [1, 1, 1]
        view[axis] = off.size
        offsets.append(off.reshape(view).astype(np.float32))
    return tuple(slice(a, b) for a, b in zip(lo, hi)), offsets


def _rotations(rng: np.random.Generator, n: int) -> np.ndarray:
    """n uniformly random 3D rotation matrices (QR of Gaussian matrices, sign-corrected)."""
    q, r = np.linalg.qr(rng.standard_normal((n, 3, 3)))
    return q * np.sign(np.diagonal(r, axis1=1, axis2=2))[:, None, :]


def _paint(scene: np.ndarray, mask: np.ndarray, sl: tuple[slice, ...], inside: np.ndarray,
           value: np.ndarray) -> None:
    np.maximum(scene[sl], np.where(inside, value, 0.0), out=scene[sl])
    mask[sl] |= inside


def draw_nuclei(shape: tuple[int, int, int], voxel: Vec3, rng: np.random.Generator, count: int,
                radius_um: tuple[float, float], texture: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Randomly oriented ellipsoids, brighter at the centre, with chromatin texture."""
    scene, mask = np.zeros(shape, np.float32), np.zeros(shape, bool)
    v = np.asarray(voxel, np.float32)
    centres = rng.uniform(0, (np.asarray(shape) - 1) * v, size=(count, 3))
    radii = rng.uniform(*radius_um, size=count)
    semi = radii[:, None] * np.column_stack([np.ones(count), rng.uniform(0.75, 1.0, count),
                                             rng.uniform(0.6, 0.9, count)])
    rots, bright = _rotations(rng, count), rng.uniform(0.45, 0.8, count)
    for c, a, rot, b in zip(centres, semi, rots, bright):
        box = _box(c, float(a.max()), v, shape)
        if box is None:
            continue
        sl, (dz, dy, dx) = box
        local = dz[..., None] * rot[0] + dy[..., None] * rot[1] + dx[..., None] * rot[2]
        q = ((local / a.astype(np.float32)) ** 2).sum(-1)
        _paint(scene, mask, sl, q <= 1.0, b * (1.0 - 0.35 * q) * texture[sl])
    return scene, mask


def vessel_centrelines(extent_um: np.ndarray, rng: np.random.Generator, total_um: float,
                       radius_um: tuple[float, float], step_um: float = 2.0
                       ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Persistent random walks branching by Murray's law: points (P, 3) µm, radii (P,), brightness (P,)."""
    points: list[np.ndarray] = []
    radii: list[float] = []
    bright: list[float] = []
    r_min, r_max = radius_um
    while len(points) * step_um < total_um:
        root, d = rng.uniform(0, extent_um), _unit(rng.standard_normal(3))
        r0, b = rng.uniform(max(r_min, 0.5 * r_max), r_max), rng.uniform(0.4, 0.7)
        stack = [(root, d, r0), (root, -d, r0)]
        while stack and len(points) * step_um < total_um:
            p, d, r = stack.pop()
            while len(points) * step_um < total_um:
                p = p + step_um * d
                if np.any(p < -r) or np.any(p > extent_um + r):
                    break
                d = _unit(d + 0.15 * rng.standard_normal(3))
                r = max(r * 0.998, r_min)
                points.append(p)
                radii.append(r)
                bright.append(b)
                if r > 1.2 * r_min and rng.random() < 0.02:
                    r1 = r * rng.uniform(0.75, 0.95)
                    r2 = max((r ** 3 - r1 ** 3) ** (1 / 3), r_min)
                    stack.append((p, _turn(d, rng), r2))
                    r = r1
    return np.asarray(points).reshape(-1, 3), np.asarray(radii), np.asarray(bright)


def _unit(v: np.ndarray) -> np.ndarray:
    return v / max(float(np.linalg.norm(v)), 1e-9)


def _turn(d: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Direction of a side branch: 30-80 degrees away from `d`, around a random perpendicular axis."""
    perp = _unit(np.cross(d, rng.standard_normal(3)))
    angle = np.deg2rad(rng.uniform(30, 80))
    return _unit(np.cos(angle) * d + np.sin(angle) * perp)


def draw_vessels(shape: tuple[int, int, int], voxel: Vec3, rng: np.random.Generator, total_um: float,
                 radius_um: tuple[float, float], batch: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """Tubes as the union of balls along the centrelines (2 µm apart, each of the local radius).

    Every centreline point is tested against one stencil of voxel offsets (the largest ball), a batch of
    points at a time, so the cost grows with the vessel length rather than the volume.
    """
    v = np.asarray(voxel)
    points, radii, bright = vessel_centrelines((np.asarray(shape) - 1) * v, rng, total_um, radius_um)
    scene, mask = np.zeros(shape, np.float32), np.zeros(shape, bool)
    half = np.ceil(radius_um[1] / v).astype(int)
    stencil = np.stack(np.meshgrid(*[np.arange(-h, h + 1) for h in half], indexing="ij"), -1).reshape(-1, 3)
    flat_scene, flat_mask = scene.reshape(-1), mask.reshape(-1)
    for start in range(0, len(points), batch):
        sl = slice(start, start + batch)
        p, r, b = points[sl], radii[sl, None], bright[sl, None]
        vox = np.round(p / v).astype(int)[:, None, :] + stencil[None]
        rho = np.linalg.norm(vox * v - p[:, None, :], axis=-1) / r
        inside = (rho <= 1.0) & np.all((vox >= 0) & (vox < np.asarray(shape)), axis=-1)
        flat = np.ravel_multi_index(tuple(vox[inside].T), shape)
        np.maximum.at(flat_scene, flat, (b * (1.0 - 0.3 * rho ** 2))[inside].astype(np.float32))
        flat_mask[flat] = True
    return scene, mask


def draw_plaques(shape: tuple[int, int, int], voxel: Vec3, rng: np.random.Generator, count: int,
                 radius_um: tuple[float, float]) -> tuple[np.ndarray, np.ndarray]:
    """Bright dense-core blobs with an irregular, noise-perturbed outline."""
    scene, mask = np.zeros(shape, np.float32), np.zeros(shape, bool)
    v = np.asarray(voxel, np.float32)
    centres = rng.uniform(0, (np.asarray(shape) - 1) * v, size=(count, 3))
    radii, bright = rng.uniform(*radius_um, size=count), rng.uniform(1.2, 2.0, count)
    for c, r, b in zip(centres, radii, bright):
        box = _box(c, 1.4 * r, v, shape)
        if box is None:
            continue
        sl, (dz, dy, dx) = box
        rho = np.sqrt(dz ** 2 + dy ** 2 + dx ** 2) / r
        rough = ndimage.gaussian_filter(rng.standard_normal(rho.shape).astype(np.float32), 1.5)
        rough /= max(float(rough.std()), 1e-6)
        _paint(scene, mask, sl, rho + 0.2 * rough < 1.0, b * (0.55 + 0.45 * np.exp(-(rho / 0.45) ** 2)))
    return scene, mask
