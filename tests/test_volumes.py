"""Volume readers: every input format gives ZYX data and the voxel size in µm from its own metadata."""
from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import tifffile
import zarr

from lsmfm.data.ingest.convert import ingest
from lsmfm.data.synthetic.write import write_nifti, write_tiff
from lsmfm.errors import InputError
from lsmfm.io.omezarr import open_image
from lsmfm.io.volumes import open_volume, read_volume

ZYX = np.arange(6 * 7 * 8, dtype=np.uint16).reshape(6, 7, 8)


def test_imagej_tiff_round_trip(tmp_path):
    write_tiff(tmp_path / "v.tif", ZYX, (4.0, 1.8, 1.8))
    data, voxel = read_volume(tmp_path / "v.tif")
    assert np.array_equal(data, ZYX) and voxel == pytest.approx((4.0, 1.8, 1.8))


def test_ome_tiff_physical_sizes_with_units(tmp_path):
    tifffile.imwrite(tmp_path / "v.ome.tif", ZYX, metadata={
        "axes": "ZYX", "PhysicalSizeZ": 2.5, "PhysicalSizeZUnit": "µm",
        "PhysicalSizeY": 650.0, "PhysicalSizeYUnit": "nm", "PhysicalSizeX": 650.0, "PhysicalSizeXUnit": "nm"})
    data, voxel = read_volume(tmp_path / "v.ome.tif")
    assert np.array_equal(data, ZYX) and voxel == pytest.approx((2.5, 0.65, 0.65))


def test_nifti_is_transposed_to_zyx_with_zooms_in_um(tmp_path):
    write_nifti(tmp_path / "v.nii.gz", ZYX, (2.0, 1.866, 1.866))
    data, voxel = read_volume(tmp_path / "v.nii.gz")
    assert np.array_equal(data, ZYX) and voxel == (2.0, 1.866, 1.866)
    img = nib.Nifti1Image(ZYX.transpose(2, 1, 0), np.diag([0.0018, 0.0018, 0.002, 1]))  # unit 'unknown' = mm
    nib.save(img, str(tmp_path / "mm.nii"))
    assert open_volume(tmp_path / "mm.nii").voxel_size == (2.0, 1.8, 1.8)
    nib.save(nib.Nifti1Image(ZYX.transpose(2, 1, 0), np.eye(4)), str(tmp_path / "unit.nii.gz"))
    assert open_volume(tmp_path / "unit.nii.gz").voxel_size == (1.0, 1.0, 1.0), "uncalibrated, not 1 mm"


def test_uncompressed_nifti_is_read_in_slabs(tmp_path):
    vol = np.random.default_rng(0).integers(0, 100, (130, 20, 30)).astype(np.uint16)
    write_nifti(tmp_path / "big.nii", vol, (1, 1, 1))
    opened = open_volume(tmp_path / "big.nii")
    assert opened.data.chunks[0] == (64, 64, 2)
    assert np.array_equal(opened.data.compute(), vol)


def test_folder_of_planes(tmp_path):
    for z, plane in enumerate(ZYX):
        tifffile.imwrite(tmp_path / f"plane_{z}.tif", plane, resolution=(1 / 0.5, 1 / 0.5),
                         imagej=True, metadata={"unit": "um"})
    (tmp_path / "notes.txt").write_text("ignored")
    data, voxel = read_volume(tmp_path)
    assert np.array_equal(data, ZYX) and voxel == pytest.approx((1.0, 0.5, 0.5))


def test_ngff_04_zarr_v2_with_time_axis_is_read_and_ingested(tmp_path):
    root = zarr.open_group(str(tmp_path / "old.zarr"), mode="w", zarr_format=2)
    root.create_array("0", data=ZYX[None, None])
    axes = [{"name": "t", "type": "time"}, {"name": "c", "type": "channel"},
            {"name": "z", "type": "space", "unit": "micrometer"},
            {"name": "y", "type": "space", "unit": "micrometer"},
            {"name": "x", "type": "space", "unit": "nanometer"}]
    scale = {"type": "scale", "scale": [1, 1, 3.0, 0.8, 800]}
    root.attrs["multiscales"] = [{"version": "0.4", "axes": axes,
                                  "datasets": [{"path": "0", "coordinateTransformations": [scale]}]}]
    vol = open_volume(tmp_path / "old.zarr")
    assert vol.data.shape == ZYX.shape and vol.voxel_size == pytest.approx((3.0, 0.8, 0.8))
    group, ms = open_image(ingest(tmp_path / "old.zarr", tmp_path / "new.zarr", progress=False))
    assert ms.version == "0.5" and ms.voxel_sizes[0] == pytest.approx((3.0, 0.8, 0.8))
    assert np.array_equal(group["0"][0], ZYX)


def test_plain_zarr_array_has_unit_voxels(tmp_path):
    zarr.save_array(str(tmp_path / "plain.zarr"), ZYX)
    data, voxel = read_volume(tmp_path / "plain.zarr")
    assert np.array_equal(data, ZYX) and voxel == (1.0, 1.0, 1.0)


def test_reader_errors_name_the_file(tmp_path):
    (tmp_path / "v.xyz").write_text("?")
    with pytest.raises(InputError, match=r"v\.xyz: unknown format"):
        open_volume(tmp_path / "v.xyz")
    tifffile.imwrite(tmp_path / "t.tif", np.zeros((3, 4, 5, 6), np.uint16), imagej=True,
                     metadata={"axes": "TZYX"})
    with pytest.raises(InputError, match=r"t\.tif: time series \(T=3\)"):
        open_volume(tmp_path / "t.tif")
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(InputError, match="holds no TIFF planes"):
        open_volume(tmp_path / "empty_dir")
