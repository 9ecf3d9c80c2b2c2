"""Intensity statistics gathered once, while level 0 is written, and the value checks they allow.

Level 0 is written one shard per task; the same task summarises its shard (count, mean and sum of
squared deviations per channel, combined across shards with Chan's formula; min, max; non-finite
voxels; a regular subsample on the whole volume's grid), a 64³ piece at a time so float64 temporaries
stay small. Min, max, mean, std and the non-finite count are exact; percentiles come from the subsample
of at most `sample_voxels` voxels per channel. Statistics cost no extra pass over the data.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import dask
import dask.array as da
import numpy as np

from lsmfm.data.ingest.pyramid import compute, shard_regions
from lsmfm.errors import InputError, LsmfmError
from lsmfm.io import omezarr
from lsmfm.io.atomic import disk_error


@dataclass
class Summary:
    """Per-channel statistics of a part of the volume; `merge` combines two parts exactly."""

    n: np.ndarray
    mean: np.ndarray
    m2: np.ndarray
    min: np.ndarray
    max: np.ndarray
    nonfinite: np.ndarray
    sample: list[np.ndarray]

    @classmethod
    def of(cls, block: np.ndarray, sample: np.ndarray, piece: int) -> "Summary":
        channels = block.shape[0]
        total = cls(np.zeros(channels), np.zeros(channels), np.zeros(channels), block.min(axis=(1, 2, 3)),
                    block.max(axis=(1, 2, 3)), np.zeros(channels, np.int64), [sample])
        for region in shard_regions(block.shape, (channels, piece, piece, piece)):
            x = block[region].reshape(channels, -1).astype(np.float64)
            finite = np.isfinite(x)
            total.nonfinite += (~finite).sum(axis=1)
            n = x.shape[1]
            mean = x.mean(axis=1)
            total.combine(np.full(channels, n), mean, ((x - mean[:, None]) ** 2).sum(axis=1))
        return total

    def combine(self, n: np.ndarray, mean: np.ndarray, m2: np.ndarray) -> None:
        both = self.n + n
        delta = mean - self.mean
        self.mean = self.mean + delta * n / both
        self.m2 = self.m2 + m2 + delta ** 2 * self.n * n / both
        self.n = both

    def merge(self, other: "Summary") -> "Summary":
        self.combine(other.n, other.mean, other.m2)
        self.min, self.max = np.minimum(self.min, other.min), np.maximum(self.max, other.max)
        self.nonfinite = self.nonfinite + other.nonfinite
        self.sample += other.sample
        return self


def write_shard(block: np.ndarray, level_path: str, region: tuple[slice, ...], stride: int, piece: int
                ) -> Summary:
    """One task: write `block` as the shard `region` of level 0 and summarise it."""
    omezarr.open_level(level_path)[region] = block
    first = [(-r.start) % stride for r in region[1:]]
    sample = block[(slice(None),) + tuple(slice(f, None, stride) for f in first)]
    return Summary.of(block, sample.reshape(block.shape[0], -1).copy(), piece)


def level0_with_stats(group: Any, data: da.Array, chunk: int, shard: int, percentiles: Sequence[float],
                      sample_voxels: int, bar: Any, where: str) -> list[dict[str, Any]]:
    """Write `data` as level "0" of `group` and return per-channel statistics (see module doc)."""
    level = omezarr.create_level(group, "0", data.shape, data.dtype, chunk, shard)
    unit = omezarr.write_unit(level)
    aligned = data.rechunk(unit)
    stride = max(1, int(np.ceil((np.prod(data.shape[1:]) / sample_voxels) ** (1 / 3))))
    path = str(omezarr.local_path(level))
    blocks = aligned.to_delayed().ravel()
    tasks = [dask.delayed(write_shard)(block, path, region, stride, chunk)
             for block, region in zip(blocks, shard_regions(data.shape, unit))]
    try:
        parts = compute(*tasks, bar=bar, step="image level 0 + statistics")
    except LsmfmError:
        raise
    except Exception as exc:  # truncated or corrupt sources fail only when their data is read
        if disk_error(exc, group.store.root) is not None or isinstance(exc, MemoryError):
            raise  # the output's disk, or memory: not the source's fault (convert.ingest_array says which)
        raise InputError(where, f"cannot read data: {type(exc).__name__}: {exc}") from exc
    channels: dict[int, Summary] = {}
    for part, region in zip(parts, shard_regions(data.shape, unit)):  # a shard holds one channel
        c = region[0].start
        channels[c] = channels[c].merge(part) if c in channels else part
    totals = [channels[c] for c in range(data.shape[0])]
    values = {key: np.concatenate([getattr(t, key) for t in totals]) for key in ("min", "max", "nonfinite")}
    values["mean"] = np.concatenate([t.mean for t in totals])
    values["std"] = np.concatenate([np.sqrt(t.m2 / t.n) for t in totals])
    values["sample"] = [np.concatenate(t.sample, axis=1)[0] for t in totals]
    check_values(values, where)
    return [_channel_stats(values, c, percentiles) for c in range(data.shape[0])]


def _channel_stats(values: dict[str, np.ndarray], c: int, percentiles: Sequence[float]) -> dict[str, Any]:
    sample = np.asarray(values["sample"][c], np.float64).ravel()
    sample = sample[np.isfinite(sample)]
    points = np.percentile(sample, percentiles) if sample.size else np.full(len(percentiles), np.nan)
    return {"percentiles": {f"{p:g}": float(v) for p, v in zip(percentiles, points)},
            "min": float(values["min"][c]), "max": float(values["max"][c]),
            "mean": float(values["mean"][c]), "std": float(values["std"][c])}


def check_values(values: dict[str, np.ndarray], where: str) -> None:
    """NaN/Inf and constant channels make normalisation meaningless: refuse them, naming the source."""
    n = len(values["min"])
    for c in range(n):
        channel = f"channel {c}: " if n > 1 else ""
        if values["nonfinite"][c]:
            bad = int(values["nonfinite"][c])
            raise InputError(where, f"{channel}{bad} NaN/Inf voxel(s); fix or mask them first")
        if values["min"][c] == values["max"][c]:
            raise InputError(where, f"{channel}constant volume (every voxel is {float(values['min'][c]):g}): "
                                    "no signal to learn from")


def omero_block(stats: list[dict[str, Any]], names: Sequence[str]) -> dict[str, Any]:
    """Display windows for viewers (napari, OME-Zarr viewers): the 0.5-99.5 percentile range per channel."""
    return {"channels": [{"label": name, "active": True, "color": "FFFFFF",
                          "window": {"min": s["min"], "max": s["max"], "start": s["percentiles"]["0.5"],
                                     "end": s["percentiles"]["99.5"]}} for name, s in zip(names, stats)]}
