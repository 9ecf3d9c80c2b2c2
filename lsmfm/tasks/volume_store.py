"""The OME-Zarr store a whole-volume prediction writes: level 0 block by block, then its pyramid and
the NGFF 0.5 metadata, so a whole-brain result opens in napari or any NGFF viewer at every scale.

    0, 1, ...          float32 probabilities (c = 1) or the restored image (c, z, y, x), mean-pooled
    labels/mask/0, ... uint8 mask (probability > threshold), max-pooled (segmentation only)

Arrays are laid out as `lsmfm ingest` writes them (`lsmfm.io.omezarr`): sharded, every chunk stored.
Each pyramid level is split into its shards; rank r of n pools the shards i with i % n == r from the
level below, so ranks never write the same file.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np

from lsmfm.io import omezarr

IMAGE, MASK = "", "labels/mask"


def create_store(path: Path, channels: int, shape: tuple[int, int, int], mask: bool, chunk: int, shard: int
                 ) -> None:
    """Empty level-0 arrays: the image and, for segmentation, the label image `labels/mask`."""
    import zarr

    root = zarr.open_group(str(path), mode="a", zarr_format=3)
    omezarr.create_level(root, "0", (channels, *shape), "float32", chunk, shard)
    if mask:
        labels = root.require_group("labels").require_group("mask")
        omezarr.create_level(labels, "0", (1, *shape), "uint8", chunk, shard)


def open_levels(path: Path, mask: bool, level: int = 0) -> tuple[Any, Any]:
    """(image, mask or None) arrays of `level`, opened for writing."""
    image = omezarr.open_level(path / str(level))
    return image, omezarr.open_level(path / MASK / str(level)) if mask else None


def create_pyramid(path: Path, factors: list[tuple[int, int, int]], mask: bool, chunk: int, shard: int
                   ) -> None:
    """Empty levels 1..n (rank 0, before the ranks fill them)."""
    import zarr

    for group_path, dtype in [(IMAGE, "float32")] + ([(MASK, "uint8")] if mask else []):
        group = zarr.open_group(str(path / group_path), mode="a")
        shape = group["0"].shape
        for level, factor in enumerate(factors, start=1):
            shape = (shape[0],) + tuple(s // f for s, f in zip(shape[1:], factor))
            if str(level) not in group:
                omezarr.create_level(group, str(level), shape, dtype, chunk, shard)


def pool_level(path: Path, level: int, factor: tuple[int, int, int], mask: bool, rank: int, world: int) -> None:
    """This rank's share of `level`: its shards, each pooled from the level below (mean; max for masks)."""
    from lsmfm.data.ingest.pyramid import pool_shard, shard_regions
    from lsmfm.io.chunk_reader import open_reader

    for group_path, method in [(IMAGE, "mean")] + ([(MASK, "max")] if mask else []):
        target = omezarr.open_level(path / group_path / str(level))
        below = open_reader(path / group_path / str(level - 1))
        for region in shard_regions(target.shape, omezarr.write_unit(target))[rank::world]:
            pool_shard(below, target, region, factor, method)


def write_metadata(path: Path, name: str, voxel_size: tuple[float, float, float],
                   factors: list[tuple[int, int, int]], info: dict[str, Any], mask: bool,
                   channel_names: Sequence[str]) -> None:
    """NGFF 0.5 multiscales (mean-pooled image, max-pooled mask), omero display windows and the run info,
    written last (rank 0, after every level is complete)."""
    import zarr

    root = zarr.open_group(str(path), mode="r+")
    if mask:
        omezarr.write_ome(root["labels/mask"], {
            "multiscales": [omezarr.multiscales_metadata("mask", voxel_size, factors, "max")],
            "image-label": {"colors": [{"label-value": 1, "rgba": [255, 64, 64, 255]}],
                            "source": {"image": "../../"}}})
        omezarr.write_ome(root["labels"], {"labels": ["mask"]})
    coarsest = np.asarray(root[str(len(factors))][:], dtype=np.float64)
    omezarr.write_ome(root, {"multiscales": [omezarr.multiscales_metadata(name, voxel_size, factors, "mean")],
                             "omero": omero(coarsest, channel_names, probability=mask)},
                      extra={"lsmfm": {"prediction": info}})


def omero(coarsest: np.ndarray, names: Sequence[str], probability: bool) -> dict[str, Any]:
    """Display windows: 0-1 for probabilities, else the 0.5-99.5 percentiles of the coarsest level."""
    channels = []
    for name, values in zip(names, coarsest):
        finite = values[np.isfinite(values)]
        lo, hi = (0.0, 1.0) if probability or not finite.size else (float(finite.min()), float(finite.max()))
        start, end = (0.0, 1.0) if probability or not finite.size else \
            tuple(float(v) for v in np.percentile(finite, [0.5, 99.5]))
        channels.append({"label": name, "active": True, "color": "FF00FF" if probability else "FFFFFF",
                         "window": {"min": lo, "max": hi, "start": start, "end": end}})
    return {"channels": channels, "rdefs": {"model": "color"}}
