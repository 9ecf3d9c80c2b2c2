"""Write a prediction next to a run, as NIfTI or OME-Zarr, with the voxel size of its source image."""
from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np

from lsmfm.io.atomic import atomic_dir, atomic_write_bytes
from lsmfm.tasks.data import Patch

FORMAT_SUFFIX = {"nifti": ".nii.gz", "zarr": ".ome.zarr"}


def prediction_path(out_dir: Path, patch: Patch, name: str, fmt: str) -> Path:
    """`<out_dir>/<stem>_<name>.nii.gz` (or `.ome.zarr`)."""
    return out_dir / f"{patch.stem}_{name}{FORMAT_SUFFIX[fmt]}"


def write_prediction(array: np.ndarray, patch: Patch, out_dir: Path, name: str, fmt: str) -> Path:
    """Save a (Z, Y, X) or (C, Z, Y, X) prediction of `patch`; NIfTI reuses a NIfTI source's header."""
    target = prediction_path(out_dir, patch, name, fmt)
    if fmt == "zarr":
        _write_zarr(array, patch, target)
    else:
        _write_nifti(array, patch, target)
    return target


def _write_nifti(array: np.ndarray, patch: Patch, target: Path) -> None:
    import nibabel as nib

    data = np.transpose(array, tuple(reversed(range(array.ndim))) if array.ndim == 3 else (3, 2, 1, 0))
    if patch.path.name.lower().endswith((".nii", ".nii.gz")):
        source = nib.load(str(patch.path))
        img = nib.Nifti1Image(data, source.affine, source.header)
        img.set_data_dtype(array.dtype)
    else:
        z, y, x = patch.voxel_size
        img = nib.Nifti1Image(data, np.diag([x, y, z, 1.0]))
        img.header.set_xyzt_units("micron")
    atomic_write_bytes(target, gzip.compress(img.to_bytes(), compresslevel=6))


def _write_zarr(array: np.ndarray, patch: Patch, target: Path) -> None:
    """A one-level NGFF 0.5 image (axes c, z, y, x; scale in micrometres), laid out as every lsmfm store."""
    import zarr

    from lsmfm.io.omezarr import create_level, multiscales_metadata, write_ome

    data = array if array.ndim == 4 else array[None]
    with atomic_dir(target, overwrite=True) as tmp:
        group = zarr.open_group(str(tmp), mode="a", zarr_format=3)  # "w" would drop atomic_dir's marker
        create_level(group, "0", data.shape, data.dtype, 64)[...] = data
        write_ome(group, {"multiscales": [multiscales_metadata(target.name, tuple(patch.voxel_size), [], "none")]},
                  {"lsmfm": {"prediction_of": str(patch.path)}})
