"""OME-Zarr (NGFF) metadata: read 0.4 and 0.5 multiscales; the layout every lsmfm store follows.

Layout written by `lsmfm ingest` (NGFF 0.5 on Zarr v3):
    STORE.zarr/zarr.json        attributes["ome"] = {"version": "0.5", "multiscales": [...], "omero": {...}}
                                attributes["lsmfm"] = {"intensity": [per channel: {"percentiles":
                                    {"0.1": v, "0.5": v, "1": v, ..., "99.5": v, "99.8": v, "99.9": v},
                                    "min", "max", "mean", "std"}], "sources": [...], "channel_names": [...],
                                    "provenance": {"lsmfm_version", "git_commit", "git_dirty"}}
    STORE.zarr/0, 1, ...        pyramid levels, axes (c, z, y, x), level 0 at full resolution; inner
                                chunks (1, 64, 64, 64), blosc-zstd, in shards of 4³ chunks (one file per
                                shard, capped at the level's extent); every chunk stored; each level halves
                                the finest axes (mean)
    STORE.zarr/labels/zarr.json attributes["ome"]["labels"] = [names]
    STORE.zarr/labels/<name>/   NGFF label image (c = 1) with the same pyramid (max pooling)
Scale transformations are in micrometres; pooled levels also carry the half-voxel translation.
The multiscales metadata is written last, and the whole store is written as `STORE.zarr.partial` and
renamed when complete, so a store without multiscales metadata is never mistaken for a finished one.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lsmfm.errors import InputError
from lsmfm.io.units import unit_factor

NGFF_VERSION = "0.5"
SHARD_CHUNKS = 4  # chunks per shard along each axis: 4³ 64³-chunks (256³ voxels) per file
WRITE_CONFIG = {"write_empty_chunks": True}


@dataclass
class Multiscales:
    """Pyramid level paths, per-level voxel sizes (z, y, x) in µm, and the axis names of the arrays."""

    paths: list[str]
    voxel_sizes: list[tuple[float, float, float]]
    axes: list[str]
    version: str


def ome_attributes(group: Any) -> dict[str, Any]:
    """The NGFF attribute block of a group, for 0.5 (`attrs["ome"]`) and 0.4 (top-level attrs)."""
    attrs = dict(group.attrs)
    if "ome" in attrs:
        return dict(attrs["ome"])
    return attrs


def read_multiscales(group: Any, path: str | Path) -> Multiscales:
    """Parse the first multiscales entry of an NGFF group; InputError names the store if it is absent."""
    ome = ome_attributes(group)
    entries = ome.get("multiscales")
    if not entries:
        raise InputError(path, "no OME-Zarr multiscales metadata: not an NGFF image, or an unfinished ingest "
                               "(re-run `lsmfm ingest` to complete it)")
    ms = entries[0]
    version = str(ome.get("version", ms.get("version", "0.4")))
    axes = [a["name"] if isinstance(a, dict) else str(a) for a in ms.get("axes", [])]
    units = [a.get("unit") if isinstance(a, dict) else None for a in ms.get("axes", [])]
    paths, sizes = [], []
    for ds in ms["datasets"]:
        scale = [1.0] * len(axes)
        for tr in ds.get("coordinateTransformations", []):
            if tr.get("type") == "scale":
                scale = [float(s) for s in tr["scale"]]
        spatial = _spatial_um(axes, units, scale, path)
        paths.append(str(ds["path"]))
        sizes.append(spatial)
    return Multiscales(paths, sizes, axes, version)


def _spatial_um(axes: list[str], units: list[str | None], scale: list[float], path: str | Path
                ) -> tuple[float, float, float]:
    out = []
    for name in "zyx":
        if name not in axes:
            raise InputError(path, f"multiscales axes {axes} lack spatial axis {name!r}")
        i = axes.index(name)
        out.append(scale[i] * unit_factor(units[i] if i < len(units) else None, 1.0))
    return (out[0], out[1], out[2])


def level_transforms(voxel_size: tuple[float, float, float], factors: list[tuple[int, int, int]]
                     ) -> list[list[dict[str, Any]]]:
    """Per-level NGFF transformations: scale (c, z, y, x) in µm and the half-voxel shift of pooled levels."""
    out = []
    cumulative = np.ones(3)
    for level in range(len(factors) + 1):
        if level:
            cumulative = cumulative * np.asarray(factors[level - 1])
        scale = np.asarray(voxel_size) * cumulative
        shift = (cumulative - 1) / 2 * np.asarray(voxel_size)
        out.append([{"type": "scale", "scale": [1.0] + [float(s) for s in scale]},
                    {"type": "translation", "translation": [0.0] + [float(t) for t in shift]}])
    return out


def multiscales_metadata(name: str, voxel_size: tuple[float, float, float],
                         factors: list[tuple[int, int, int]], method: str) -> dict[str, Any]:
    """One NGFF 0.5 multiscales entry for levels "0", "1", ... with axes (c, z, y, x) in micrometres."""
    axes = [{"name": "c", "type": "channel"}] + [
        {"name": a, "type": "space", "unit": "micrometer"} for a in "zyx"]
    datasets = [{"path": str(i), "coordinateTransformations": tr}
                for i, tr in enumerate(level_transforms(voxel_size, factors))]
    return {"name": name, "axes": axes, "datasets": datasets, "type": method,
            "metadata": {"method": f"lsmfm: {method} pooling by {factors}"}}


def level_shards(shape: tuple[int, ...], chunk: int, shard: int) -> tuple[tuple[int, ...], tuple[int, ...] | None]:
    """(inner chunk shape, shard shape or None) of a (c, z, y, x) level: chunks of `chunk` voxels and
    shards of `shard` chunks per axis, both capped at the array's extent (`shard` <= 1: no sharding)."""
    chunks = (1,) + tuple(min(chunk, int(s)) for s in shape[1:])
    if shard <= 1:
        return chunks, None
    return chunks, (1,) + tuple(min(c * shard, -(-int(s) // c) * c) for c, s in zip(chunks[1:], shape[1:]))


def create_level(group: Any, path: str, shape: tuple[int, ...], dtype: Any, chunk: int,
                 shard: int = SHARD_CHUNKS) -> Any:
    """An empty pyramid level: inner chunks (1, chunk, chunk, chunk), blosc-zstd with bit shuffle, in
    shards of `shard`³ chunks (see `level_shards`). Every chunk is stored, also one holding only the
    fill value, and the array says so (`lsmfm.io.chunks`): an absent chunk is then a lost one."""
    from zarr.codecs import BloscCodec

    from lsmfm.io.chunks import EVERY_CHUNK_WRITTEN

    chunks, shards = level_shards(shape, chunk, shard)
    return group.create_array(path, shape=tuple(int(s) for s in shape), chunks=chunks, shards=shards,
                              dtype=dtype, compressors=BloscCodec(cname="zstd", clevel=5, shuffle="bitshuffle"),
                              dimension_names=["c", "z", "y", "x"], fill_value=0,
                              attributes={"lsmfm": {EVERY_CHUNK_WRITTEN: True}}, config=WRITE_CONFIG)


def open_level(path: str | Path, mode: str = "r+") -> Any:
    """Reopen a level for writing with the config it was created with (every chunk stored)."""
    import zarr

    return zarr.open_array(str(path), mode=mode).with_config(WRITE_CONFIG)  # open_array drops `config`


def local_path(node: Any) -> Path:
    """The folder of a zarr group or array in a local store (every store lsmfm writes)."""
    return Path(node.store.root) / node.path


def write_unit(array: Any) -> tuple[int, ...]:
    """The region one writer must own whole: the shard of a sharded array, else the chunk."""
    return tuple(array.shards or array.chunks)


def write_ome(group: Any, ome: dict[str, Any], extra: dict[str, Any] | None = None) -> None:
    """Write the NGFF block (and lsmfm's own attributes) in one metadata update, as the last step.
    lsmfm's own block (`extra["lsmfm"]`) always records the lsmfm that wrote it (`provenance`)."""
    from lsmfm.provenance import KEY, provenance

    attrs = {"ome": {"version": NGFF_VERSION, **ome}}
    if extra:
        attrs.update(extra)
    if "lsmfm" in attrs:
        attrs["lsmfm"] = {**attrs["lsmfm"], KEY: provenance()}
    group.attrs.update(attrs)


def is_complete_image(path: str | Path) -> bool:
    """True when `path` is an NGFF image whose multiscales metadata exists (an ingest that finished)."""
    p = Path(path)
    for meta in (p / "zarr.json", p / ".zattrs"):
        if meta.is_file():
            try:
                attrs = json.loads(meta.read_text())
            except (OSError, ValueError):
                return False
            attrs = attrs.get("attributes", attrs) if meta.name == "zarr.json" else attrs
            return bool(attrs.get("ome", attrs).get("multiscales"))
    return False


def open_image(path: str | Path) -> tuple[Any, Multiscales]:
    """Open an NGFF image read-only: (zarr group, multiscales); InputError if missing or unfinished."""
    import zarr

    p = Path(path)
    if not p.exists():
        raise InputError(p, "missing OME-Zarr store (create it with `lsmfm ingest` or `catalog ingest`)")
    try:
        group = zarr.open_group(str(p), mode="r")
    except Exception as exc:  # a folder that is not a Zarr group raises store-specific errors
        raise InputError(p, f"not a Zarr group: {type(exc).__name__}: {exc}") from exc
    return group, read_multiscales(group, p)


def read_intensity(group: Any) -> list[dict[str, Any]]:
    """Per-channel intensity statistics stored at ingest (`attrs["lsmfm"]["intensity"]`); [] when absent."""
    return list(dict(group.attrs).get("lsmfm", {}).get("intensity", []))


def stored_percentile(stats: dict[str, Any], q: float) -> float:
    """Percentile `q` of one channel's stored statistics, interpolated linearly between stored percentiles."""
    table = sorted((float(k), float(v)) for k, v in stats["percentiles"].items())
    qs, vs = zip(*table)
    if not qs[0] <= q <= qs[-1]:
        raise ValueError(f"percentile {q} outside the stored range [{qs[0]}, {qs[-1]}]")
    return float(np.interp(q, qs, vs))
