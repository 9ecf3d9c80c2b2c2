"""The embedded default data: light-sheet-like volumes with ground truth, deterministic by seed.

`generate_volume` draws nuclei (ellipsoids), vessels (branching tubes of varying radius) and amyloid
plaques (sparse bright irregular blobs) in physical units (`scene`), then images them with the synthetic
microscope of `optics` (anisotropic PSF, Poisson-Gaussian noise, uneven illumination, stripe
shadows). Masks use the structure names of the real finetuning data, so every task of the toolkit can
run on this data with no download; `lsmfm.data.synthetic.write` lays the volumes out on disk.

Example:
    >>> vol = generate_volume(SynthConfig(shape=(64, 64, 64), seed=1))
    >>> vol.image.dtype, sorted(vol.masks)
    (dtype('uint16'), ['amyloid_plaque', 'cell_nucleus', 'vessels'])
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np

from lsmfm.data.synthetic import optics, scene

STRUCTURES = ("cell_nucleus", "vessels", "amyloid_plaque")


@dataclass(frozen=True)
class SynthConfig:
    """One synthetic volume. Sizes in µm, densities per mm³ of tissue, voxel size (z, y, x) in µm."""

    shape: tuple[int, int, int] = (128, 128, 128)
    seed: int = 0
    voxel_size: tuple[float, float, float] = (4.0, 1.8, 1.8)
    structures: tuple[str, ...] = STRUCTURES
    nuclei_per_mm3: float = 80_000.0
    nucleus_radius_um: tuple[float, float] = (4.5, 7.5)
    vessel_mm_per_mm3: float = 400.0  # centreline length density (brain capillaries: ~500-1000)
    vessel_radius_um: tuple[float, float] = (2.0, 8.0)  # (thinnest capillary, largest root vessel)
    plaques_per_mm3: float = 300.0
    min_plaques: int = 0
    plaque_radius_um: tuple[float, float] = (6.0, 18.0)
    background: float = 0.08  # tissue autofluorescence, relative to a nucleus (~0.6)
    psf_sigma_um: tuple[float, float, float] = (5.0, 1.2, 1.2)
    illumination_falloff: float = 0.3  # fraction of the sheet's excitation lost across x
    stripes_per_mm2: float = 1500.0  # absorbers casting shadows, per mm² of the (z, y) plane
    stripe_strength: tuple[float, float] = (0.1, 0.5)
    photons: float = 400.0  # expected photons at scene intensity 1
    background_photons: float = 10.0
    gain: float = 2.0  # ADU per photon
    offset: float = 100.0  # ADU
    read_noise: float = 3.0  # ADU

    def __post_init__(self) -> None:
        if len(self.shape) != 3 or min(self.shape) < 8:
            raise ValueError(f"shape must be 3 sizes >= 8, got {self.shape}")
        if len(self.voxel_size) != 3 or min(self.voxel_size) <= 0:
            raise ValueError(f"voxel_size must be 3 positive µm values, got {self.voxel_size}")
        unknown = sorted(set(self.structures) - set(STRUCTURES))
        if unknown:
            raise ValueError(f"unknown structures {unknown}; choose from {list(STRUCTURES)}")
        for name in ("nucleus_radius_um", "vessel_radius_um", "plaque_radius_um", "stripe_strength"):
            lo, hi = getattr(self, name)
            if not 0 <= lo <= hi:
                raise ValueError(f"{name} must be (low, high) with 0 <= low <= high, got {(lo, hi)}")
        if not 0 <= self.illumination_falloff < 1 or self.stripe_strength[1] >= 1:
            raise ValueError("illumination_falloff and stripe_strength must lie in [0, 1)")


@dataclass
class SyntheticVolume:
    """`image` is what the microscope records, `blurred` its noise-free expectation, `sharp` that without PSF.

    `sharp` and `blurred` are float32 in the image's units (ADU), so (image -> sharp) and
    (blurred -> sharp) are deblurring pairs. Masks are exclusive: plaques over vessels over nuclei.
    """

    image: np.ndarray
    sharp: np.ndarray
    blurred: np.ndarray
    masks: dict[str, np.ndarray]
    voxel_size: tuple[float, float, float]
    config: SynthConfig = field(repr=False, default_factory=SynthConfig)


# Tissue presets, one per dominant structure: whole demo volumes and classification patches use them.
PRESETS: dict[str, dict] = {
    "cell_nucleus": dict(nuclei_per_mm3=150_000.0, vessel_mm_per_mm3=100.0, plaques_per_mm3=0.0),
    "vessels": dict(nuclei_per_mm3=15_000.0, vessel_mm_per_mm3=2000.0, plaques_per_mm3=0.0),
    "amyloid_plaque": dict(nuclei_per_mm3=60_000.0, vessel_mm_per_mm3=300.0, plaques_per_mm3=1500.0,
                           min_plaques=1),
}


def preset_config(structure: str, shape: tuple[int, int, int], seed: int, **overrides) -> SynthConfig:
    """The SynthConfig of tissue dominated by `structure` (a key of PRESETS)."""
    if structure not in PRESETS:
        raise ValueError(f"unknown structure {structure!r}; choose from {list(PRESETS)}")
    return replace(SynthConfig(shape=shape, seed=seed), **{**PRESETS[structure], **overrides})


def derived_seed(*keys: int) -> int:
    """A well-mixed 32-bit seed from integer keys, so volume i of run s never shares a stream with another."""
    return int(np.random.SeedSequence(list(keys)).generate_state(1)[0])


def generate_volume(cfg: SynthConfig) -> SyntheticVolume:
    """Draw the tissue, image it, and return image, sharp/blurred pair and exclusive masks."""
    rngs = [np.random.default_rng(s) for s in np.random.SeedSequence(cfg.seed).spawn(6)]
    layers, masks = _draw_tissue(cfg, rngs[:3])
    tissue = _compose(cfg, layers, masks, rngs[3])
    emission = tissue * _excitation(cfg, rngs[4])
    photons = cfg.photons * emission + cfg.background_photons
    blurred_photons = optics.psf_blur(photons, cfg.psf_sigma_um, cfg.voxel_size)
    return SyntheticVolume(
        image=optics.camera(blurred_photons, cfg.gain, cfg.offset, cfg.read_noise, rngs[5]),
        sharp=optics.to_adu(photons, cfg.gain, cfg.offset),
        blurred=optics.to_adu(blurred_photons, cfg.gain, cfg.offset),
        masks=masks, voxel_size=tuple(float(v) for v in cfg.voxel_size), config=cfg)  # type: ignore[arg-type]


def _tissue_volume_mm3(cfg: SynthConfig) -> float:
    return float(np.prod(np.asarray(cfg.shape) * np.asarray(cfg.voxel_size))) * 1e-9


def _draw_tissue(cfg: SynthConfig, rngs: list[np.random.Generator]
                 ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    shape, vox, mm3 = cfg.shape, cfg.voxel_size, _tissue_volume_mm3(cfg)
    layers, masks = {}, {}
    if "cell_nucleus" in cfg.structures:
        texture = 0.85 + 0.15 * scene.smooth_noise(shape, 1.0, rngs[0])
        count = int(rngs[0].poisson(cfg.nuclei_per_mm3 * mm3))
        layers["cell_nucleus"], masks["cell_nucleus"] = scene.draw_nuclei(
            shape, vox, rngs[0], count, cfg.nucleus_radius_um, texture)
    if "vessels" in cfg.structures:
        layers["vessels"], masks["vessels"] = scene.draw_vessels(
            shape, vox, rngs[1], cfg.vessel_mm_per_mm3 * mm3 * 1e3, cfg.vessel_radius_um)
    if "amyloid_plaque" in cfg.structures:
        count = max(int(rngs[2].poisson(cfg.plaques_per_mm3 * mm3)), cfg.min_plaques)
        layers["amyloid_plaque"], masks["amyloid_plaque"] = scene.draw_plaques(
            shape, vox, rngs[2], count, cfg.plaque_radius_um)
    for name in STRUCTURES:
        masks.setdefault(name, np.zeros(shape, bool))
    return layers, masks


def _compose(cfg: SynthConfig, layers: dict[str, np.ndarray], masks: dict[str, np.ndarray],
             rng: np.random.Generator) -> np.ndarray:
    """Background tissue, then each structure over the previous ones; masks made exclusive to match."""
    coarse = 15.0 / min(cfg.voxel_size)
    tissue = (cfg.background * (1.0 + 0.3 * scene.smooth_noise(cfg.shape, coarse, rng))).clip(0, None)
    above = np.zeros(cfg.shape, bool)
    for name in reversed(STRUCTURES):
        masks[name] &= ~above
        above |= masks[name]
    for name in STRUCTURES:
        if name in layers:
            tissue = np.where(masks[name], layers[name], tissue)
    return tissue.astype(np.float32)


def _excitation(cfg: SynthConfig, rng: np.random.Generator) -> np.ndarray:
    area_mm2 = cfg.shape[0] * cfg.voxel_size[0] * cfg.shape[1] * cfg.voxel_size[1] * 1e-6
    stripes = int(rng.poisson(cfg.stripes_per_mm2 * area_mm2))
    return (optics.illumination(cfg.shape, cfg.illumination_falloff, rng)
            * optics.stripe_shadows(cfg.shape, cfg.voxel_size, stripes, cfg.stripe_strength, rng))
