"""The synthetic data on disk, laid out like the real data: ImageJ TIFF volumes + label TIFFs
(`write_synth_dataset`, what `lsmfm synth` writes), NIfTI finetuning patches in the layout of
../shared/data/lsm_fm_samples/finetune (`write_finetune_patches`), and the demo catalog
(`write_demo_catalog`) with a text description per structure.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from lsmfm.data.synthetic import optics
from lsmfm.data.synthetic.volume import (STRUCTURES, SynthConfig, SyntheticVolume, derived_seed,
                                         generate_volume, preset_config)

DESCRIPTIONS = {
    "cell_nucleus": [
        "Synthetic light-sheet fluorescence volume of cleared mouse brain tissue with a nuclear stain: "
        "densely packed ellipsoidal cell nuclei 9-15 µm across, brighter at their centres and textured by "
        "chromatin, with a few faint capillaries.",
        "Simulated nuclear counterstain (SYTO/DAPI-like) imaged by light-sheet microscopy at 1.8 µm lateral "
        "and 4 µm axial sampling: round nuclei throughout the tissue, blurred along the detection axis, with "
        "shot noise, uneven illumination and stripe shadows along the light sheet.",
    ],
    "vessels": [
        "Synthetic light-sheet fluorescence volume of a vascular stain (lectin-like) in cleared mouse brain: "
        "a branching network of tubular blood vessels that taper from large vessels to thin capillaries, "
        "with sparse dim nuclei in the background.",
        "Simulated cleared-tissue vasculature: bright continuous tubes 4-16 µm wide that branch and curve "
        "through the volume, imaged with an anisotropic light-sheet point spread function, shot noise and "
        "stripe artefacts.",
    ],
    "amyloid_plaque": [
        "Synthetic light-sheet fluorescence volume of an Alzheimer's disease mouse model brain stained for "
        "amyloid: sparse, very bright, irregular plaques with dense cores over dimmer nuclei and vessels.",
        "Simulated amyloid-beta plaque staining in cleared brain tissue: a few compact bright blobs 12-36 µm "
        "across with rough outlines, light-sheet blur, shot noise and stripe shadows.",
    ],
}
STAINS = {"cell_nucleus": "synthetic nuclear stain", "vessels": "synthetic vascular stain",
          "amyloid_plaque": "synthetic amyloid stain"}


def demo_volume_names(volumes: int = 3) -> list[tuple[str, str]]:
    """(name, dominant structure) of the volumes `lsmfm synth` writes, cycling through the presets."""
    return [(f"synth_{i:02d}_{STRUCTURES[i % len(STRUCTURES)]}", STRUCTURES[i % len(STRUCTURES)])
            for i in range(volumes)]


def write_nifti(path: Path, zyx: np.ndarray, voxel_size: tuple[float, float, float]) -> None:
    """NIfTI in the XYZ order NIfTI readers expect (lsmfm.io.volumes transposes back), zooms in µm."""
    import nibabel as nib

    affine = np.diag([voxel_size[2], voxel_size[1], voxel_size[0], 1.0])
    img = nib.Nifti1Image(np.ascontiguousarray(zyx.transpose(2, 1, 0)), affine)
    img.header.set_xyzt_units("micron")
    nib.save(img, str(path))


def write_tiff(path: Path, zyx: np.ndarray, voxel_size: tuple[float, float, float]) -> None:
    """ImageJ hyperstack TIFF with the voxel size in its resolution tags and `spacing`."""
    import tifffile

    tifffile.imwrite(path, zyx, imagej=True, resolution=(1 / voxel_size[2], 1 / voxel_size[1]),
                     metadata={"spacing": voxel_size[0], "unit": "um", "axes": "ZYX"})


def finetune_patch(structure: str, patch: int, seed: int) -> tuple[SyntheticVolume, np.ndarray]:
    """A patch of tissue dominated by `structure` and its extra-degraded copy for deblurring."""
    vol = generate_volume(preset_config(structure, (patch,) * 3, seed))
    rng = np.random.default_rng(seed)
    image = vol.image.astype(np.float32)
    extra = optics.psf_blur(image, (4.0, 1.8, 1.8), vol.voxel_size)
    noise = 0.01 * float(np.percentile(image, 99)) * rng.standard_normal(image.shape).astype(np.float32)
    return vol, extra + noise


def write_finetune_patches(out_dir: str | Path, n_per_class: dict[str, int] | None = None, patch: int = 64,
                           seed: int = 0, progress: bool = True) -> Path:
    """Finetuning patches in the layout of lsm_fm_samples/finetune: <split>/<structure>_patch_NNN_volVVV_ch0*.

    For each split and structure: the image (float32 raw counts), `_label` (uint8 mask of that
    structure) and `_blurred` (the image blurred again, plus noise of 1 % of its 99th percentile: the
    deblurring input, as in the real data). The folder is replaced atomically.
    """
    from lsmfm.io.atomic import atomic_dir
    from lsmfm.progress import progress_bar

    counts = {"train": 4, "val": 2, "test": 2} if n_per_class is None else dict(n_per_class)
    jobs = [(split, s) for split, n in counts.items() for s in STRUCTURES for _ in range(n)]
    index = {s: 0 for s in STRUCTURES}
    with atomic_dir(out_dir, overwrite=True) as tmp:
        for split, structure in progress_bar(jobs, desc="finetune patches", unit="patch", enabled=progress):
            k = index[structure]
            index[structure] += 1
            vol_seed = derived_seed(seed, 1, STRUCTURES.index(structure), k)
            vol, degraded = finetune_patch(structure, patch, vol_seed)
            stem = tmp / split / f"{structure}_patch_{k:03d}_vol{k:03d}_ch0"
            stem.parent.mkdir(exist_ok=True)
            write_nifti(stem.with_name(stem.name + ".nii.gz"), vol.image.astype(np.float32), vol.voxel_size)
            write_nifti(stem.with_name(stem.name + "_label.nii.gz"), vol.masks[structure].astype(np.uint8),
                        vol.voxel_size)
            write_nifti(stem.with_name(stem.name + "_blurred.nii.gz"), degraded, vol.voxel_size)
    return Path(out_dir)


def write_synth_dataset(out: str | Path, size: int = 128, seed: int = 0, volumes: int = 3, patch: int = 64,
                        n_per_class: dict[str, int] | None = None, progress: bool = True) -> Path:
    """`lsmfm synth`: out/volumes/<name>.tif (uint16), out/labels/<name>_<structure>.tif, out/finetune/."""
    from lsmfm.io.atomic import atomic_dir
    from lsmfm.progress import progress_bar

    out = Path(out)
    with atomic_dir(out / "volumes", overwrite=True) as vol_dir, \
            atomic_dir(out / "labels", overwrite=True) as lab_dir:
        for i, (name, structure) in enumerate(progress_bar(demo_volume_names(volumes), desc="volumes",
                                                           unit="volume", enabled=progress)):
            vol = generate_volume(preset_config(structure, (size,) * 3, derived_seed(seed, 0, i)))
            write_tiff(vol_dir / f"{name}.tif", vol.image, vol.voxel_size)
            for s in STRUCTURES:
                write_tiff(lab_dir / f"{name}_{s}.tif", vol.masks[s].astype(np.uint8), vol.voxel_size)
    write_finetune_patches(out / "finetune", n_per_class, patch, seed, progress)
    return out


def write_demo_catalog(path: str | Path, synth_dir: str | Path, stores_dir: str | Path, volumes: int = 3,
                       seed: int = 0) -> Path:
    """The catalog of the volumes `lsmfm synth` writes: stores in `stores_dir`, sources in `synth_dir`."""
    from lsmfm.data.catalog.entries import relative_to, write_catalog

    here = Path(path).resolve().parent
    synth = Path(synth_dir)
    entries = [{
        "id": name, "store": relative_to(Path(stores_dir) / f"{name}.zarr", here),
        "source": relative_to(synth / "volumes" / f"{name}.tif", here),
        "label_sources": {s: relative_to(synth / "labels" / f"{name}_{s}.tif", here) for s in STRUCTURES},
        "labels": structure, "channel": 0, "organism": "mouse (synthetic)", "stain": STAINS[structure],
        "voxel_size": list(SynthConfig().voxel_size), "descriptions": DESCRIPTIONS[structure],
        "class_label": structure, "weight": 1.0,
    } for name, structure in demo_volume_names(volumes)]
    defaults = {"licence": "MIT",
                "citation": f"lsmfm synthetic light-sheet generator (`lsmfm synth --seed {seed}`)"}
    header = ("Synthetic demo data: `lsmfm synth` writes the sources, `lsmfm catalog ingest` the stores.")
    return write_catalog(path, entries, defaults=defaults, header=header)
