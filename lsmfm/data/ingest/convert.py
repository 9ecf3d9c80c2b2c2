"""Convert volumes (TIFF, OME-TIFF, NIfTI, TIFF plane folders, Zarr) into one OME-Zarr image.

Everything goes through Dask in shard-sized pieces (one task per output file), so memory stays bounded
whatever the volume size: level 0 is written straight from the (lazy) source while the same pass gathers
the intensity statistics; each coarser level is read back from the level below, pooled and written. The
tasks run on local threads, or on a `dask.distributed` cluster when a client is active (`lsmfm ingest
--workers N / --dask-address`): the same graph, so the same store. The store is built as
`<out>.partial` under the output's lock (`lsmfm.io.lock`), its multiscales metadata written last and
renamed when complete, so an interrupted or failed ingest never looks finished; a re-run removes the
leftover and starts over. The layout is documented in `lsmfm.io.omezarr`.
"""
from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any, Mapping, Sequence

import dask.array as da
import numpy as np

from lsmfm.errors import InputError, LsmfmError
from lsmfm.io import omezarr
from lsmfm.io.atomic import commit_partial, disk_error
from lsmfm.io.lock import output_lock, partial_dir
from lsmfm.io.omezarr import SHARD_CHUNKS
from lsmfm.io.volumes import open_volume

PERCENTILES = (0.1, 0.5, 1.0, 2.0, 5.0, 50.0, 95.0, 98.0, 99.0, 99.5, 99.8, 99.9)
SAMPLE_VOXELS = 2_000_000  # per channel, for the percentiles


def ingest(sources: str | Path | Sequence[str | Path], out: str | Path,
           labels: Mapping[str, str | Path] | None = None, chunk: int = 64, levels: int | None = None,
           overwrite: bool = False, progress: bool = True, shard: int = SHARD_CHUNKS) -> Path:
    """Ingest one image (several `sources` are its channels) and optional label images into `out`."""
    paths = [Path(sources)] if isinstance(sources, (str, Path)) else [Path(s) for s in sources]
    if not paths:
        raise InputError(None, "no source volume given")
    for p in paths + [Path(v) for v in (labels or {}).values()]:
        if p.exists() and Path(out).exists() and p.resolve() == Path(out).resolve():
            raise InputError(p, "is both a source and the output store")
    check_target(out, overwrite)
    data, voxel_size = _open_channels(paths)
    label_data = {name: _open_label(Path(p), data.shape[1:]) for name, p in (labels or {}).items()}
    return ingest_array(data, voxel_size, out, labels=label_data, chunk=chunk, levels=levels,
                        overwrite=overwrite, progress=progress, sources=[str(p) for p in paths], shard=shard)


def ingest_array(data: da.Array | np.ndarray, voxel_size: Sequence[float], out: str | Path,
                 labels: Mapping[str, da.Array | np.ndarray] | None = None, chunk: int = 64,
                 levels: int | None = None, overwrite: bool = False, progress: bool = True,
                 sources: Sequence[str] = (), shard: int = SHARD_CHUNKS) -> Path:
    """Write a (C,)Z,Y,X array, possibly lazy and larger than memory, as an OME-Zarr image at `out`:
    inner chunks of `chunk`³ voxels in shards of `shard`³ chunks (`shard=1`: one file per chunk)."""
    out = Path(out)
    where = ", ".join(sources) or str(out)
    if chunk < 8:
        raise InputError(None, f"chunk must be >= 8 voxels, got {chunk}")
    if shard < 1:
        raise InputError(None, f"shard must be >= 1 chunks per axis (1: no sharding), got {shard}")
    data = _as_czyx(da.asarray(data), where)
    voxel = _check_voxel(voxel_size, where)
    label_data = {name: _as_label(da.asarray(lab), data.shape[1:], name, where)
                  for name, lab in (labels or {}).items()}
    factors = pyramid_factors(data.shape[1:], voxel, chunk, levels)
    check_target(out, overwrite)
    with output_lock(out, "lsmfm ingest"):
        check_target(out, overwrite)  # again: another writer may have finished it meanwhile
        partial = partial_dir(out)
        try:
            _write_store(partial, data, voxel, label_data, factors, (chunk, shard), progress, list(sources),
                         where)
            commit_partial(partial, out)
        except BaseException as exc:
            shutil.rmtree(partial, ignore_errors=True)
            error = _output_error(exc, out, data, chunk, shard)
            if error is exc:
                raise
            raise error from exc
    return out


def _output_error(exc: BaseException, out: Path, data: da.Array, chunk: int, shard: int) -> BaseException:
    """A full disk names the output store and memory exhaustion the shard size, not the source."""
    if isinstance(exc, MemoryError):
        mib = chunk**3 * min(shard, 8) ** 3 * data.dtype.itemsize / 2**20
        return LsmfmError(f"{out}: out of memory while ingesting; each task holds a shard of about {mib:.0f} "
                          "MiB (several at once): pass a smaller --shard, or run with fewer threads/workers")
    return disk_error(exc, out) or exc


def check_target(out: str | Path, overwrite: bool) -> None:
    """Refuse to replace an existing store unless asked: a complete one, or any folder that is in the way."""
    out = Path(out)
    if not out.exists() or overwrite:
        return
    if omezarr.is_complete_image(out):
        raise InputError(out, "already a complete OME-Zarr image; pass --overwrite to replace it")
    raise InputError(out, "exists and is not a complete OME-Zarr image; remove it or pass --overwrite")


def pyramid_factors(shape: Sequence[int], voxel: Sequence[float], chunk: int = 64,
                    levels: int | None = None) -> list[tuple[int, int, int]]:
    """Per-level pooling factors (z, y, x): halve the finest axes first, so anisotropic voxels become cubic.

    With `levels=None`, add levels until the level fits in one chunk along its longest side (at least
    two levels in all); otherwise exactly `levels` levels where the volume allows it.
    """
    if levels is not None and levels < 2:
        raise InputError(None, f"levels must be >= 2 (full resolution and a coarse level), got {levels}")
    size, vox = np.asarray(shape, int), np.asarray(voxel, float)
    factors: list[tuple[int, int, int]] = []
    while True:
        n_levels = len(factors) + 1
        if levels is not None and n_levels >= levels:
            break
        if levels is None and n_levels >= 2 and size.max() <= chunk:
            break
        can = size >= 2
        fine = can & (vox < vox[can].max() / 1.5) if can.any() else can
        step = np.where(fine if fine.any() else can, 2, 1)
        if not (step > 1).any():
            break
        factors.append(tuple(int(s) for s in step))  # type: ignore[arg-type]
        size, vox = size // step, vox * step
    return factors


def _open_channels(paths: list[Path]) -> tuple[da.Array, tuple[float, float, float]]:
    vols = [open_volume(p) for p in paths]
    first = vols[0]
    for vol in vols[1:]:
        if vol.spatial_shape != first.spatial_shape:
            raise InputError(vol.path, f"shape {vol.spatial_shape} differs from {first.path} "
                                       f"{first.spatial_shape}: channels of one image must match")
        if not np.allclose(vol.voxel_size, first.voxel_size, rtol=0.01):
            raise InputError(vol.path, f"voxel size {vol.voxel_size} µm differs from {first.path} "
                                       f"{first.voxel_size} µm: channels of one image must match")
    arrays = [v.czyx for v in vols]
    dtype = np.result_type(*[a.dtype for a in arrays])
    return da.concatenate([a.astype(dtype) for a in arrays], axis=0), first.voxel_size


def _open_label(path: Path, shape: tuple[int, ...]) -> da.Array:
    vol = open_volume(path)
    if vol.data.ndim != 3:
        raise InputError(path, f"a label image must be 3D (Z, Y, X), got shape {tuple(vol.data.shape)}")
    if vol.spatial_shape != tuple(shape):
        raise InputError(path, f"label shape {vol.spatial_shape} differs from the image shape {tuple(shape)}")
    return vol.data


def _as_czyx(data: da.Array, where: str) -> da.Array:
    if data.ndim == 3:
        data = data[None]
    if data.ndim != 4:
        raise InputError(where, f"expected a 3D volume (Z, Y, X) or (C, Z, Y, X), got shape {data.shape}")
    if min(data.shape) < 1:
        raise InputError(where, f"volume is empty: shape {data.shape}")
    if min(data.shape[1:]) < 2:
        raise InputError(where, f"not a 3D volume: shape {data.shape} has a spatial side of length 1")
    if data.dtype == bool:
        data = data.astype(np.uint8)
    if not (np.issubdtype(data.dtype, np.integer) or np.issubdtype(data.dtype, np.floating)):
        raise InputError(where, f"unsupported data type {data.dtype}")
    return data if data.dtype.isnative else data.astype(data.dtype.newbyteorder("="))


def _as_label(lab: da.Array, shape: tuple[int, ...], name: str, where: str) -> da.Array:
    """Labels as (1, Z, Y, X) integers; float masks (common in NIfTI) are truncated to integers."""
    if not re.fullmatch(r"[\w.+-]+", name):
        raise InputError(where, f"label name {name!r} must be letters, digits, '_', '.', '+', '-'")
    if tuple(lab.shape) != tuple(shape):
        raise InputError(where, f"label {name!r} has shape {tuple(lab.shape)}, the image {tuple(shape)}")
    if lab.dtype == bool:
        return lab.astype(np.uint8)[None]
    if np.issubdtype(lab.dtype, np.floating):
        return lab.astype(np.uint32)[None]
    return (lab if lab.dtype.isnative else lab.astype(lab.dtype.newbyteorder("=")))[None]


def _check_voxel(voxel_size: Sequence[float], where: str) -> tuple[float, float, float]:
    voxel = tuple(float(v) for v in voxel_size)
    if len(voxel) != 3 or not all(np.isfinite(v) and v > 0 for v in voxel):
        raise InputError(where, f"voxel size must be 3 positive µm values (z, y, x), got {tuple(voxel_size)}")
    return voxel  # type: ignore[return-value]


def _write_store(path: Path, data: da.Array, voxel: tuple[float, float, float],
                 labels: Mapping[str, da.Array], factors: list[tuple[int, int, int]], grid: tuple[int, int],
                 progress: bool, sources: list[str], where: str) -> None:
    import zarr

    from lsmfm.data.ingest.stats import level0_with_stats, omero_block
    from lsmfm.data.ingest.pyramid import progress_bar, write_pyramid

    name = Path(sources[0]).name if sources else path.name.removesuffix(".partial")
    group = zarr.open_group(str(path), mode="a", zarr_format=3)
    with progress_bar(f"ingest {name}", progress) as bar:
        stats = level0_with_stats(group, data, *grid, PERCENTILES, SAMPLE_VOXELS, bar, where)
        write_pyramid(group, factors, *grid, "mean", bar)
        if labels:
            _write_labels(group, labels, voxel, factors, grid, bar)
    channels = [Path(s).name for s in sources] if len(sources) == data.shape[0] else \
        [f"channel {i}" for i in range(data.shape[0])]
    omezarr.write_ome(group, {"multiscales": [omezarr.multiscales_metadata(name, voxel, factors, "mean")],
                              "omero": omero_block(stats, channels)},
                      {"lsmfm": {"intensity": stats, "sources": sources, "channel_names": channels}})


def _write_labels(group: Any, labels: Mapping[str, da.Array], voxel: tuple[float, float, float],
                  factors: list[tuple[int, int, int]], grid: tuple[int, int], bar: Any) -> None:
    from lsmfm.data.ingest.pyramid import store_level, write_pyramid

    parent = group.require_group("labels")
    for name, lab in labels.items():
        sub = parent.require_group(name)
        store_level(sub, "0", lab, *grid, bar, f"label {name} level 0")
        write_pyramid(sub, factors, *grid, "max", bar, name=f"label {name}")
        omezarr.write_ome(sub, {"multiscales": [omezarr.multiscales_metadata(name, voxel, factors, "max")],
                                "image-label": {"source": {"image": "../../"}}})
    omezarr.write_ome(parent, {"labels": list(labels)})
