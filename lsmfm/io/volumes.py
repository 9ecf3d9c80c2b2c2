"""Open 3D volumes from TIFF/OME-TIFF, NIfTI, a folder of 2D TIFF planes, or (OME-)Zarr, lazily.

Every reader returns a `Volume`: a Dask array in ZYX order (a leading channel axis only when the
source has several channels) and the voxel size in micrometres, so downstream code never needs to
know the file format. Data is not read until computed.
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import dask.array as da
import numpy as np

from lsmfm.errors import InputError
from lsmfm.io.chunk_reader import Reopened, as_dask
from lsmfm.io.units import unit_factor

TIFF_SUFFIXES = (".tif", ".tiff")
NIFTI_SUFFIXES = (".nii", ".nii.gz")


@dataclass
class Volume:
    """A lazily read volume: `data` is (Z, Y, X) or (C, Z, Y, X); `voxel_size` is (z, y, x) in µm."""

    data: da.Array
    voxel_size: tuple[float, float, float]
    path: str

    @property
    def spatial_shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.data.shape[-3:])  # type: ignore[return-value]

    @property
    def czyx(self) -> da.Array:
        """`data` with its channel axis, (C, Z, Y, X), also for a single-channel volume."""
        return self.data if self.data.ndim == 4 else self.data[None]


def volume_format(path: str | Path) -> str:
    """Name the reader for `path`: 'tiff', 'nifti', 'planes', 'zarr'; InputError when unknown."""
    p = Path(path)
    name = p.name.lower()
    if not p.exists():
        raise InputError(p, "no such file or folder")
    if name.endswith(".zarr") or (p.is_dir() and ((p / "zarr.json").exists() or (p / ".zarray").exists()
                                                  or (p / ".zgroup").exists())):
        return "zarr"
    if p.is_dir():
        if any(f.suffix.lower() in TIFF_SUFFIXES for f in p.iterdir()):
            return "planes"
        raise InputError(p, "folder holds no TIFF planes and is not a Zarr store")
    if name.endswith(TIFF_SUFFIXES):
        return "tiff"
    if name.endswith(NIFTI_SUFFIXES):
        return "nifti"
    raise InputError(p, "unknown format; expected .tif/.tiff, .nii/.nii.gz, .zarr or a folder of TIFF planes")


def open_volume(path: str | Path) -> Volume:
    """Open any supported volume lazily and check its dimensionality."""
    fmt = volume_format(path)
    opener = {"tiff": _open_tiff, "nifti": _open_nifti, "planes": _open_planes, "zarr": _open_zarr}[fmt]
    try:
        vol = opener(Path(path))
    except InputError:
        raise
    except Exception as exc:  # corrupt or truncated files surface as many exception types
        raise InputError(path, f"cannot read {fmt} file: {type(exc).__name__}: {exc}") from exc
    return _checked(vol)


def read_volume(path: str | Path) -> tuple[np.ndarray, tuple[float, float, float]]:
    """Read a whole (small) volume into memory: (array, voxel size in µm)."""
    vol = open_volume(path)
    try:
        return materialize(vol.data), vol.voxel_size
    except Exception as exc:
        raise InputError(path, f"cannot read data: {type(exc).__name__}: {exc}") from exc


def materialize(array: da.Array, scheduler: str | None = None) -> np.ndarray:
    """Read a (sliced) lazy array into one preallocated NumPy array, chunk by chunk: the peak is the
    result plus the chunks in flight, not the ~2x of `compute()`, which concatenates the chunks."""
    out = np.empty(array.shape, dtype=array.dtype)
    da.store(array, out, lock=False, scheduler=scheduler)
    return out


def _checked(vol: Volume) -> Volume:
    data = vol.data
    if data.ndim == 4 and data.shape[0] == 1:
        data = data[0]
    if data.ndim not in (3, 4):
        raise InputError(vol.path, f"expected a 3D volume (Z, Y, X) or (C, Z, Y, X), got shape "
                                   f"{tuple(data.shape)}")
    if min(data.shape[-3:]) < 1:
        raise InputError(vol.path, f"volume is empty: shape {tuple(data.shape)}")
    if not (np.issubdtype(data.dtype, np.integer) or np.issubdtype(data.dtype, np.floating)
            or data.dtype == bool):
        raise InputError(vol.path, f"unsupported data type {data.dtype}")
    if any(not np.isfinite(v) or v <= 0 for v in vol.voxel_size):
        raise InputError(vol.path, f"invalid voxel size {vol.voxel_size}")
    return Volume(data, tuple(float(v) for v in vol.voxel_size), vol.path)  # type: ignore[arg-type]


def _open_tiff(path: Path) -> Volume:
    import tifffile
    import zarr

    with _tifffile_problems() as problems, tifffile.TiffFile(path) as tif:
        series = tif.series[0]
        axes = series.axes
        voxel = _tiff_voxel_size(tif)
        _check_tiff_extent(tif, series, path, problems)
    with tifffile.imread(path, aszarr=True) as store:
        arr = zarr.open(store, mode="r")
        shape, dtype, chunks = arr.shape, arr.dtype, arr.chunks
    data = da.from_array(_TiffArray(path, shape, dtype), chunks=chunks, asarray=True, fancy=False,
                         meta=np.empty((0,) * len(shape), dtype))
    return Volume(_to_czyx(data, axes, path), voxel, str(path))


class _TiffArray(Reopened):
    def _open(self):
        import tifffile
        import zarr

        return zarr.open(tifffile.imread(self.path, aszarr=True), mode="r")


@contextlib.contextmanager
def _tifffile_problems() -> Iterator[list[str]]:
    """Collect what tifffile logs while parsing (a broken page chain is only logged, then the pages
    read so far look like a complete, shorter file)."""
    problems: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            problems.append(record.getMessage())

    handler, logger = Collect(logging.WARNING), logging.getLogger("tifffile")
    logger.addHandler(handler)
    try:
        yield problems
    finally:
        logger.removeHandler(handler)


def _check_tiff_extent(tif, series, path: Path, problems: list[str]) -> None:
    """A truncated TIFF: its data needs more bytes than the file has, or its page chain breaks."""
    size = os.path.getsize(path)
    end = max((o + c for page in tif.pages if page is not None
               for o, c in zip(getattr(page, "dataoffsets", ()), getattr(page, "databytecounts", ()))),
              default=0)
    if series.dataoffset is not None:
        end = max(end, series.dataoffset + series.nbytes)
    if end > size:
        raise InputError(path, f"truncated TIFF: its image data needs {end} bytes, the file has {size}")
    broken = [p for p in problems if "invalid page offset" in p or "corrupted" in p]
    if broken:
        raise InputError(path, f"truncated or corrupt TIFF: its page list breaks after {len(tif.pages)} "
                               f"page(s) ({broken[-1].split('> ')[-1]})")


def _to_czyx(arr: da.Array, axes: str, path: Path) -> da.Array:
    """Reorder TIFF series axes to (C, Z, Y, X) / (Z, Y, X), dropping singleton T/S."""
    axes = axes.upper().replace("Q", "Z").replace("I", "Z")
    for ax in "TS":
        if ax in axes:
            i = axes.index(ax)
            if arr.shape[i] != 1 and ax == "T":
                raise InputError(path, f"time series (T={arr.shape[i]}) are not supported; export one "
                                       "time point")
            if arr.shape[i] != 1 and ax == "S":
                axes = axes.replace("S", "C") if "C" not in axes else axes
                continue
            arr = arr[(slice(None),) * i + (0,)]
            axes = axes[:i] + axes[i + 1:]
    if "Z" not in axes:
        raise InputError(path, f"TIFF has no Z axis (axes {axes}, shape {tuple(arr.shape)}): a 2D image, "
                               "not a volume")
    order = [axes.index(a) for a in "CZYX" if a in axes]
    if len(order) != arr.ndim:
        raise InputError(path, f"unsupported TIFF axes {axes!r}")
    return arr.transpose(order)


def _tiff_voxel_size(tif) -> tuple[float, float, float]:
    if tif.is_ome and tif.ome_metadata:
        size = _ome_voxel_size(tif.ome_metadata)
        if size:
            return size
    page = tif.pages[0]
    ij = tif.imagej_metadata or {}
    factor = unit_factor(ij.get("unit"), 1.0)
    xy = []
    for tag in ("YResolution", "XResolution"):
        t = page.tags.get(tag)
        if t is None:
            xy.append(1.0)
            continue
        num, den = t.value if isinstance(t.value, tuple) else (t.value, 1)
        xy.append(den / num * factor if num else 1.0)
    z = float(ij.get("spacing", 1.0)) * factor
    return (z, xy[0], xy[1])


def _ome_voxel_size(xml: str) -> tuple[float, float, float] | None:
    try:
        root = ET.fromstring(xml)
    except ET.ParseError:
        return None
    pixels = next((el for el in root.iter() if el.tag.endswith("Pixels")), None)
    if pixels is None:
        return None
    out = []
    for ax in "ZYX":
        val = pixels.get(f"PhysicalSize{ax}")
        factor = unit_factor(pixels.get(f"PhysicalSize{ax}Unit", "µm"), 1.0)
        out.append(float(val) * factor if val else 1.0)
    return (out[0], out[1], out[2])


def _open_nifti(path: Path) -> Volume:
    """NIfTI lazily; uncompressed files in z-slabs (cheap seeks), gzipped ones whole (gzip cannot seek),
    each checked against its header first (size; gzip length, and the CRC when the data is read)."""
    import nibabel as nib

    img = nib.load(str(path))
    shape = img.shape
    if len(shape) not in (3, 4):
        raise InputError(path, f"expected a 3D NIfTI volume (optionally with channels), got shape {shape}")
    dtype = img.get_data_dtype()
    needed = int(img.dataobj.offset) + math.prod(shape) * dtype.itemsize
    meta = np.empty((0,) * len(shape), dtype=dtype)
    if str(path).lower().endswith(".gz"):
        _check_gzip_length(path, needed)
        arr = da.from_array(_NiftiGz(path, shape, meta.dtype), chunks=-1, asarray=True, fancy=False, meta=meta)
    else:
        size = os.path.getsize(path)
        if size < needed:
            raise InputError(path, f"truncated NIfTI: the header needs {needed} bytes, the file has {size}")
        chunks = (-1, -1, 64) + (-1,) * (len(shape) - 3)
        arr = da.from_array(img.dataobj, chunks=chunks, asarray=True, fancy=False, meta=meta)
    if arr.ndim == 4:
        arr = arr[..., 0] if arr.shape[3] == 1 else arr.transpose(3, 0, 1, 2)
    spatial_axes = arr.ndim - 3
    arr = arr.transpose(tuple(range(spatial_axes)) + tuple(reversed(range(spatial_axes, arr.ndim))))
    return Volume(arr, _nifti_voxel_size(img), str(path))


def _check_gzip_length(path: Path, needed: int) -> None:
    """The gzip trailer's length (mod 2^32) must match the header's data size; when it does not (a
    truncated file, or a multi-member gzip), decompress it all now, which says which it is."""
    with open(path, "rb") as fh:
        fh.seek(-4, os.SEEK_END)
        isize = int.from_bytes(fh.read(4), "little")
    if isize != needed % 2**32:
        _NiftiGz.decompress(path, needed)


class _NiftiGz(Reopened):
    """A gzipped NIfTI, decompressed whole on each read with its gzip CRC and length checked (nibabel
    alone reads only the header's data size, so a corrupt or truncated stream passes unnoticed)."""

    def _open(self):
        return self

    def _read(self, source, index: tuple) -> np.ndarray:
        import nibabel as nib

        img = nib.load(self.path)
        needed = int(img.dataobj.offset) + math.prod(img.shape) * img.get_data_dtype().itemsize
        whole = type(img).from_bytes(self.decompress(self.path, needed))
        return np.asanyarray(whole.dataobj[index])

    @staticmethod
    def decompress(path: str | Path, needed: int) -> bytes:
        import gzip
        import zlib

        try:
            with gzip.open(path, "rb") as fh:
                data = fh.read()
        except (OSError, EOFError, zlib.error) as exc:  # BadGzipFile (CRC, length) is an OSError
            raise InputError(path, f"corrupt or truncated gzip stream: {exc}") from exc
        if len(data) < needed:
            raise InputError(path, f"truncated NIfTI: the header needs {needed} bytes, the stream has "
                                   f"{len(data)}")
        return data


def _nifti_voxel_size(img) -> tuple[float, float, float]:
    """Zooms in µm (z, y, x). NIfTI's unit defaults to mm; unit zooms with no unit mean uncalibrated: 1 µm."""
    unit = img.header.get_xyzt_units()[0]
    zooms = [float(z) for z in img.header.get_zooms()[:3]]
    if unit == "unknown" and all(z == 1.0 for z in zooms):
        return (1.0, 1.0, 1.0)
    factor = unit_factor(unit, 1e3)
    um = [float(f"{z * factor:.6g}") for z in zooms]  # float32 zooms: keep their real precision only
    return (um[2], um[1], um[0])


def natural_key(p: Path) -> list:
    """Sort key comparing digit runs as numbers: 'p2' before 'p10'."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", p.name)]


def _open_planes(path: Path) -> Volume:
    import dask
    import tifffile

    files = sorted((f for f in path.iterdir() if f.suffix.lower() in TIFF_SUFFIXES), key=natural_key)
    with tifffile.TiffFile(files[0]) as tif:
        first = tif.series[0]
        shape, dtype = first.shape, first.dtype
        yx = _tiff_voxel_size(tif)[1:]
    if len(shape) != 2:
        raise InputError(files[0], f"expected 2D planes, got shape {shape}")
    planes = [da.from_delayed(dask.delayed(_read_plane)(f, shape), shape, dtype) for f in files]
    return Volume(da.stack(planes), (1.0, yx[0], yx[1]), str(path))


def _read_plane(path: Path, shape: tuple[int, ...]) -> np.ndarray:
    import tifffile

    plane = tifffile.imread(path)
    if plane.shape != shape:
        raise InputError(path, f"plane shape {plane.shape} differs from the first plane's {shape}")
    return plane


def _open_zarr(path: Path) -> Volume:
    """A plain Zarr array (unit voxels) or an NGFF image's level 0, with (t,) c, z, y, x axes in any
    order, read through `lsmfm.io.chunk_reader` in units of the array's stored objects (shards)."""
    import zarr

    node = zarr.open(str(path), mode="r")
    if isinstance(node, zarr.Array):
        return Volume(_zarr_dask(path, node), (1.0, 1.0, 1.0), str(path))
    from lsmfm.io.omezarr import read_multiscales

    ms = read_multiscales(node, path)
    arr = _zarr_dask(path / ms.paths[0], node[ms.paths[0]], _witness(path, node, ms))
    axes = list(ms.axes) if len(ms.axes) == arr.ndim else list("czyx"[-arr.ndim:])
    for extra in [a for a in axes if a not in "czyx"]:
        i = axes.index(extra)
        if arr.shape[i] != 1:
            raise InputError(path, f"axis {extra!r} has size {arr.shape[i]}; only (c, z, y, x) images work")
        arr, axes = arr[(slice(None),) * i + (0,)], axes[:i] + axes[i + 1:]
    return Volume(arr.transpose([axes.index(a) for a in "czyx" if a in axes]), ms.voxel_sizes[0], str(path))


def _zarr_dask(path: Path, array, witness: tuple[str, tuple[int, ...]] | None = None) -> da.Array:
    return as_dask(path, array.shape, array.dtype, tuple(getattr(array, "shards", None) or array.chunks),
                   witness)


def _witness(path: Path, node, ms) -> tuple[str, tuple[int, ...]] | None:
    """Level 1 and its integer pooling factors per axis, to tell lost level-0 chunks from empty ones."""
    if len(ms.paths) < 2:
        return None
    fine, coarse = node[ms.paths[0]].shape, node[ms.paths[1]].shape
    factors = tuple(max(1, round(f / c)) for f, c in zip(fine, coarse))
    if any(f // k != c for f, k, c in zip(fine, factors, coarse)):
        return None  # not a plain integer pooling: it cannot witness
    return str(path / ms.paths[1]), factors
