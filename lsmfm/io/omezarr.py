"""OME-Zarr (NGFF) metadata: read 0.4 and 0.5 multiscales; the layout every lsmfm store follows.

Layout written by `lsmfm ingest` (NGFF 0.5 on Zarr v3):
    STORE.zarr/zarr.json        attributes["ome"] = {"version": "0.5", "multiscales": [...]}
                                attributes["lsmfm"] = {"intensity": {...}, "sources": [...]}
    STORE.zarr/0, 1, ...        pyramid levels, axes (c, z, y, x), level 0 at full resolution
    STORE.zarr/labels/<name>/   NGFF label images with the same pyramid
The multiscales metadata is written last, so a store without it is an unfinished ingest.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lsmfm.errors import InputError

NGFF_VERSION = "0.5"


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
    from lsmfm.io.volumes import _unit_factor

    out = []
    for name in "zyx":
        if name not in axes:
            raise InputError(path, f"multiscales axes {axes} lack spatial axis {name!r}")
        i = axes.index(name)
        out.append(scale[i] * _unit_factor(units[i] if i < len(units) else None, 1.0))
    return (out[0], out[1], out[2])
