"""The embedded default data: determinism, exclusive masks, the noise model, the PSF, files on disk."""
from __future__ import annotations

import re

import numpy as np
import pytest

from lsmfm.cli.main import main
from lsmfm.data.synthetic import optics as synth_optics
from lsmfm.data.synthetic import scene as synth_scene
from lsmfm.data.synthetic.volume import STRUCTURES, SynthConfig, derived_seed, generate_volume, preset_config
from lsmfm.data.synthetic.write import demo_volume_names, write_finetune_patches
from lsmfm.io.volumes import read_volume

SMALL = SynthConfig(shape=(24, 48, 40), seed=3, min_plaques=2)


@pytest.fixture(scope="module")
def small():
    return generate_volume(SMALL)


def test_deterministic_by_seed(small):
    again = generate_volume(SMALL)
    other = generate_volume(SynthConfig(shape=SMALL.shape, seed=4, min_plaques=2))
    assert np.array_equal(small.image, again.image)
    assert all(np.array_equal(small.masks[k], again.masks[k]) for k in STRUCTURES)
    assert not np.array_equal(small.image, other.image)


def test_volume_fields_and_exclusive_masks(small):
    assert small.image.dtype == np.uint16 and small.image.shape == SMALL.shape
    assert small.sharp.dtype == small.blurred.dtype == np.float32
    assert sorted(small.masks) == sorted(STRUCTURES)
    stacked = np.stack([small.masks[k] for k in STRUCTURES])
    assert stacked.sum(0).max() == 1, "a voxel belongs to at most one structure"
    assert all(small.masks[k].any() for k in STRUCTURES)
    assert small.voxel_size == (4.0, 1.8, 1.8)


def test_structures_are_brighter_than_background(small):
    background = ~np.any(np.stack(list(small.masks.values())), axis=0)
    bg = small.sharp[background].mean()
    for name in STRUCTURES:
        assert small.sharp[small.masks[name]].mean() > 1.5 * bg, name
    assert small.sharp[small.masks["amyloid_plaque"]].mean() > small.sharp[small.masks["cell_nucleus"]].mean()


def test_poisson_gaussian_noise_model(small):
    """image = camera(blurred): residual mean ~0, variance gain * (blurred - offset) + read_noise² + 1/12."""
    cfg = SMALL
    residual = small.image.astype(np.float64) - small.blurred
    predicted = cfg.gain * (small.blurred - cfg.offset) + cfg.read_noise ** 2 + 1 / 12
    assert abs(residual.mean()) < 0.05 * np.sqrt(predicted.mean())
    assert residual.var() == pytest.approx(predicted.mean(), rel=0.05)


def test_psf_is_anisotropic_in_micrometres():
    point = np.zeros((41, 41, 41), np.float32)
    point[20, 20, 20] = 1.0
    blurred = synth_optics.psf_blur(point, (5.0, 1.2, 1.2), (4.0, 1.8, 1.8))
    coords = np.arange(41) - 20
    for axis, expected_sigma in zip(range(3), (5.0 / 4.0, 1.2 / 1.8, 1.2 / 1.8)):
        profile = blurred.sum(axis=tuple(a for a in range(3) if a != axis))
        sigma = np.sqrt((profile * coords ** 2).sum() / profile.sum())
        assert sigma == pytest.approx(expected_sigma, rel=0.02)


def test_stripe_shadows_only_darken_along_the_sheet():
    rng = np.random.default_rng(0)
    shadows = synth_optics.stripe_shadows((8, 30, 40), (4.0, 1.8, 1.8), 20, (0.2, 0.5), rng)
    assert shadows.max() <= 1.0 and shadows.min() > 0.0
    assert np.all(np.diff(shadows, axis=2) <= 1e-6), "a shadow, once cast, persists along x"
    assert shadows[:, :, -1].min() < 0.9


def test_illumination_falls_off_along_x():
    field = synth_optics.illumination((4, 6, 50), 0.3, np.random.default_rng(0))
    ratio = field[..., -1].mean() / field[..., 0].mean()
    assert ratio == pytest.approx(0.7, abs=0.1)


def test_vessel_trees_respect_radius_range_and_length():
    rng = np.random.default_rng(1)
    points, radii, _ = synth_scene.vessel_centrelines(np.full(3, 200.0), rng, 3000.0, (2.0, 8.0))
    assert len(points) * 2.0 >= 3000.0
    assert radii.min() >= 2.0 and radii.max() <= 8.0
    assert np.unique(np.round(radii, 3)).size > 10, "radii vary along the trees"


def test_presets_are_dominated_by_their_structure():
    fractions = {s: generate_volume(preset_config(s, (32, 48, 48), 5)).masks for s in STRUCTURES}
    nuc, ves = fractions["cell_nucleus"], fractions["vessels"]
    assert nuc["cell_nucleus"].mean() > 3 * nuc["vessels"].mean()
    assert ves["vessels"].mean() > 3 * ves["cell_nucleus"].mean()
    assert fractions["amyloid_plaque"]["amyloid_plaque"].any()
    assert not nuc["amyloid_plaque"].any() and not ves["amyloid_plaque"].any()


def test_finetune_patches_layout_and_round_trip(tmp_path):
    out = write_finetune_patches(tmp_path / "ft", {"train": 2, "val": 1, "test": 0}, patch=24, seed=1,
                                 progress=False)
    names = sorted(p.name for p in out.rglob("*.nii.gz"))
    assert len(names) == (2 + 1) * len(STRUCTURES) * 3
    pattern = re.compile(r"(amyloid_plaque|cell_nucleus|vessels)_patch_\d{3}_vol\d{3}_ch0"
                         r"(_label|_blurred)?\.nii\.gz")
    assert all(pattern.fullmatch(n) for n in names)
    assert not (out / "test").exists() or not any((out / "test").iterdir())
    stem = out / "train" / "vessels_patch_001_vol001_ch0"
    image, voxel = read_volume(f"{stem}.nii.gz")
    label, _ = read_volume(f"{stem}_label.nii.gz")
    blurred, _ = read_volume(f"{stem}_blurred.nii.gz")
    assert image.shape == label.shape == blurred.shape == (24, 24, 24)
    assert image.dtype == np.float32 and label.dtype == np.uint8 and voxel == pytest.approx((4.0, 1.8, 1.8))
    seed = derived_seed(1, 1, STRUCTURES.index("vessels"), 1)
    expected = generate_volume(preset_config("vessels", (24,) * 3, seed))
    assert np.array_equal(image, expected.image.astype(np.float32))
    assert np.array_equal(label, expected.masks["vessels"].astype(np.uint8))
    assert blurred.std() < image.std(), "the deblurring input is smoother than the target"


def test_synth_cli_writes_volumes_labels_and_patches(tmp_path):
    out = tmp_path / "synth"
    assert main(["synth", "--out", str(out), "--size", "32", "--volumes", "2", "--patch", "16",
                 "--per-class", "1", "0", "1"]) == 0
    names = [n for n, _ in demo_volume_names(2)]
    assert sorted(p.stem for p in (out / "volumes").glob("*.tif")) == names
    image, voxel = read_volume(out / "volumes" / f"{names[1]}.tif")
    assert image.dtype == np.uint16 and image.shape == (32, 32, 32)
    assert voxel == pytest.approx((4.0, 1.8, 1.8))
    vessels, _ = read_volume(out / "labels" / f"{names[1]}_vessels.tif")
    assert vessels.dtype == np.uint8 and 0 < vessels.mean() < 1
    assert len(list((out / "finetune").rglob("*_label.nii.gz"))) == 2 * len(STRUCTURES)


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="unknown structures"):
        SynthConfig(structures=("axons",))
    with pytest.raises(ValueError, match="shape"):
        SynthConfig(shape=(4, 64, 64))
