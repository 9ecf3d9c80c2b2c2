"""Intensity statistics gathered once, while level 0 is written, and the value checks they allow.

Min, max, mean, std and the count of non-finite values are exact (Dask reductions over every chunk);
percentiles come from a regular subsample of at most `sample_voxels` voxels per channel. Both share
the one read of the source that writes level 0, so statistics cost no extra pass over the data.
"""
from __future__ import annotations

from typing import Any, Sequence

import dask.array as da
import numpy as np

from lsmfm.data.ingest.pyramid import compute, store_graph
from lsmfm.errors import InputError, LsmfmError


def level0_with_stats(group: Any, data: da.Array, chunk: int, percentiles: Sequence[float],
                      sample_voxels: int, bar: Any, where: str) -> list[dict[str, Any]]:
    """Write `data` as level "0" of `group` and return per-channel statistics (see module doc)."""
    aligned, store = store_graph(group, "0", data, chunk)
    spatial = (1, 2, 3)
    stride = max(1, int(np.ceil((np.prod(data.shape[1:]) / sample_voxels) ** (1 / 3))))
    reductions = {
        "min": aligned.min(axis=spatial), "max": aligned.max(axis=spatial),
        "mean": aligned.mean(axis=spatial, dtype=np.float64),
        "std": aligned.std(axis=spatial, dtype=np.float64),
        "nonfinite": (da.count_nonzero(~da.isfinite(aligned), axis=spatial)
                      if np.issubdtype(data.dtype, np.floating) else da.zeros(data.shape[0], int)),
        "sample": aligned[:, ::stride, ::stride, ::stride],
    }
    try:
        _, values = compute(store, reductions, bar=bar, step="image level 0 + statistics")
    except LsmfmError:
        raise
    except Exception as exc:  # truncated or corrupt sources fail only when their data is read
        raise InputError(where, f"cannot read data: {type(exc).__name__}: {exc}") from exc
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
