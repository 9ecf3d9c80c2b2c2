"""Where each streamed patch comes from: a pure function of (seed, rank, sample index).

Keeping every random choice a function of the sample index (not of worker state or of what was read
before) is what makes a stream reproducible from its seed, split cleanly over ranks and DataLoader
workers, and resumable from a sample count stored in a checkpoint.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from lsmfm.data.stream.config import ForegroundConfig, StreamConfig
from lsmfm.errors import InputError
from lsmfm.io.omezarr import read_multiscales, stored_percentile

MAP_CELLS_PER_AXIS = 128  # foreground maps are coarsened to at most this many cells per axis


def sample_rng(seed: int, rank: int, index: int) -> np.random.Generator:
    """The random generator of one sample; independent streams for every (seed, rank, index)."""
    return np.random.default_rng([seed, rank, index])


def worker_indices(start: int, worker: int, num_workers: int, block: int = 1) -> Iterator[int]:
    """Global sample indices of one worker, forever: blocks of `block` consecutive indices from `start`,
    dealt round-robin, so worker w takes block b when b % num_workers == w.

    With block = 1 worker w takes i - start ≡ w (mod num_workers). A DataLoader with batch size B gives
    each worker whole batches and delivers them round-robin, so block = B makes the loader yield
    indices start, start + 1, ... in order: resuming from `start` = samples consumed continues exactly.
    """
    b = worker
    while True:
        first = start + b * block
        yield from range(first, first + block)
        b += num_workers


def choose_weighted(rng: np.random.Generator, weights: Sequence[float]) -> int:
    """Index drawn with probability proportional to `weights` (one uniform draw, stable across numpy)."""
    cum = np.cumsum(np.asarray(weights, dtype=np.float64))
    return int(min(np.searchsorted(cum, rng.random() * cum[-1], side="right"), len(cum) - 1))


class ForegroundMap:
    """Foreground voxel counts of a coarse level, binned into at most MAP_CELLS_PER_AXIS cells per axis.

    `fraction(start, size, shape)` is the foreground share of a region given in the coordinates of an
    array of `shape` (the level patches are read from), mapped onto the coarse grid by the shape ratio.
    """

    def __init__(self, counts: np.ndarray, totals: np.ndarray, coarse_shape: Sequence[int],
                 factors: Sequence[int]) -> None:
        self.counts = counts
        self.totals = totals
        self.coarse_shape = tuple(int(s) for s in coarse_shape)
        self.factors = tuple(int(f) for f in factors)

    @classmethod
    def from_mask(cls, mask) -> "ForegroundMap":
        """Build from a boolean coarse-level mask (numpy or Dask: Dask bounds the memory of big levels)."""
        import dask.array as da

        mask = da.asarray(mask)
        factors = [max(1, math.ceil(s / MAP_CELLS_PER_AXIS)) for s in mask.shape]
        pad = [(0, (-s) % f) for s, f in zip(mask.shape, factors)]
        axes = dict(enumerate(factors))
        fg = da.coarsen(np.sum, da.pad(mask.astype(np.uint32), pad), axes)
        ones = da.ones(mask.shape, dtype=np.uint32, chunks=mask.chunks)
        valid = da.coarsen(np.sum, da.pad(ones, pad), axes)
        # synchronous: dask's thread pool does not survive a fork into DataLoader workers (it deadlocks)
        counts, totals = da.compute(fg, valid, scheduler="synchronous")
        return cls(counts.astype(np.uint32), totals.astype(np.uint32), mask.shape, factors)

    def fraction(self, start: Sequence[int], size: Sequence[int], shape: Sequence[int]) -> float:
        cells = []
        for s, n, full, coarse, f in zip(start, size, shape, self.coarse_shape, self.factors):
            lo = math.floor(s * coarse / full)
            hi = max(lo + 1, math.ceil((s + n) * coarse / full))
            cells.append(slice(lo // f, -(-min(hi, coarse) // f)))
        total = int(self.totals[tuple(cells)].sum())
        return float(self.counts[tuple(cells)].sum()) / total if total else 0.0


def choose_position(rng: np.random.Generator, shape: Sequence[int], region: Sequence[int],
                    fg_map: ForegroundMap | None, cfg: ForegroundConfig) -> tuple[int, ...]:
    """Start of a region of size `region` inside `shape`: uniform, retried while it is background."""
    best, best_frac = None, -1.0
    movable = any(s > r for s, r in zip(shape, region))
    tries = cfg.max_tries if cfg.enabled and fg_map is not None and movable else 1
    for _ in range(tries):
        pos = tuple(int(rng.integers(0, s - r + 1)) for s, r in zip(shape, region))
        if tries == 1:
            return pos
        frac = fg_map.fraction(pos, region, shape)  # type: ignore[union-attr]
        if frac >= cfg.min_fraction:
            return pos
        if frac > best_frac:
            best, best_frac = pos, frac
    return best  # type: ignore[return-value]


@dataclass
class ImagePlan:
    """What to read from one OME-Zarr image: the array, the region size, and the normalisation bounds."""

    store: str
    array_path: str  # pyramid level patches are read from
    coarse_path: str  # pyramid level of the foreground map
    axes: list[str]
    channel: int
    shape: tuple[int, int, int]  # (z, y, x) of the read level
    region: tuple[int, int, int]  # (z, y, x) read per patch, resampled to the patch size when different
    percentiles: tuple[float, float]
    bounds: tuple[float, float] | None  # store intensity percentiles, None when the store has no statistics

    def index(self, box: tuple[slice, ...]) -> tuple[Any, ...]:
        """Index into the array for a (z, y, x) box: the channel picked, other non-spatial axes at 0."""
        spatial = dict(zip("zyx", box))
        return tuple(spatial[a] if a in spatial else (self.channel if a == "c" else 0) for a in self.axes)


def plan_image(path: str | Path, channel: int | None, cfg: StreamConfig) -> ImagePlan:
    """Check one image from its JSON metadata (no zarr call: safe before DataLoader workers fork)."""
    store = Path(path)
    if not store.exists():
        raise InputError(store, "OME-Zarr store not found")
    attrs, shape_of = _store_metadata(store)
    ms = read_multiscales(SimpleNamespace(attrs=attrs), store)
    n = len(ms.paths)
    level = _read_level(ms, cfg, store)
    fg_level = cfg.foreground.level + n if cfg.foreground.level < 0 else cfg.foreground.level
    if not 0 <= fg_level < n:
        raise InputError(store, f"foreground.level {cfg.foreground.level} is outside the {n} pyramid levels")
    full = shape_of(ms.paths[level])
    shape = tuple(int(full[ms.axes.index(a)]) for a in "zyx")
    c = _channel(store, ms.axes, full, channel)
    region = tuple(cfg.read_size or cfg.patch_size)
    if cfg.target_voxel_size is not None:
        region = tuple(max(1, round(p * t / v)) for p, t, v in zip(cfg.patch_size, cfg.target_voxel_size,
                                                                    ms.voxel_sizes[level]))
    if any(r > s for r, s in zip(region, shape)):
        raise InputError(store, f"patch region {list(region)} (z, y, x; patch {list(cfg.patch_size)}) is "
                                f"larger than the volume {list(shape)} at pyramid level {level}")
    percentiles = (cfg.normalize.lower, cfg.normalize.upper)
    bounds = _store_bounds(attrs, c, percentiles)
    if bounds is None and cfg.normalize.source == "store":
        raise InputError(store, f"no intensity statistics for percentiles {list(percentiles)} of channel {c} "
                                "in attrs['lsmfm']['intensity']: re-ingest with `lsmfm ingest`, or set "
                                "normalize.source: patch")
    return ImagePlan(str(store), str(store / ms.paths[level]), str(store / ms.paths[fg_level]), ms.axes, c,
                     shape, region, percentiles, bounds)  # type: ignore[arg-type]


def _store_metadata(store: Path) -> tuple[dict[str, Any], Callable[[str], list[int]]]:
    """Group attributes and an array-shape lookup, for Zarr v3 (zarr.json) and v2 (.zattrs/.zarray)."""
    v3 = (store / "zarr.json").is_file()
    if not v3 and not (store / ".zgroup").is_file():
        raise InputError(store, "not a Zarr store (no zarr.json or .zgroup)")
    attrs_file = store / ("zarr.json" if v3 else ".zattrs")
    try:
        meta = json.loads(attrs_file.read_text()) if attrs_file.is_file() else {}
    except (OSError, ValueError) as exc:
        raise InputError(attrs_file, f"unreadable Zarr metadata: {exc}") from exc
    attrs = meta.get("attributes", {}) if v3 else meta

    def shape_of(level: str) -> list[int]:
        f = store / level / ("zarr.json" if v3 else ".zarray")
        try:
            return [int(s) for s in json.loads(f.read_text())["shape"]]
        except (OSError, ValueError, KeyError) as exc:
            raise InputError(f, f"missing or unreadable pyramid level {level!r}: {exc}") from exc

    return attrs, shape_of


def _read_level(ms: Any, cfg: StreamConfig, store: Path) -> int:
    """`cfg.level`, or with a target voxel size the coarsest level still at least that fine on every axis."""
    if cfg.level >= len(ms.paths):
        raise InputError(store, f"level {cfg.level} requested but the store has {len(ms.paths)} pyramid "
                                "levels")
    level = cfg.level
    if cfg.target_voxel_size is not None:
        for i in range(cfg.level + 1, len(ms.paths)):
            if all(v <= t * 1.01 for v, t in zip(ms.voxel_sizes[i], cfg.target_voxel_size)):
                level = i
    return level


def _channel(store: Path, axes: list[str], shape: list[int], channel: int | None) -> int:
    n = shape[axes.index("c")] if "c" in axes else 1
    if channel is None:
        if n > 1:
            raise InputError(store, f"store has {n} channels: set `channel` in its catalog entry")
        return 0
    if not 0 <= channel < n:
        raise InputError(store, f"channel {channel} requested but the store has {n} channel(s)")
    return channel


def _store_bounds(attrs: dict[str, Any], channel: int, percentiles: tuple[float, float]
                  ) -> tuple[float, float] | None:
    """The (lower, upper) intensity percentiles recorded at ingest for `channel` (interpolated between the
    stored ones), or None when the store has no statistics covering them."""
    stats = attrs.get("lsmfm", {}).get("intensity") or []
    if channel >= len(stats) or not stats[channel].get("percentiles"):
        return None
    try:
        return tuple(stored_percentile(stats[channel], p) for p in percentiles)  # type: ignore[return-value]
    except ValueError:
        return None
