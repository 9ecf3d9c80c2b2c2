"""Multiscale pyramids written chunk by chunk with Dask: memory is a few chunks per worker thread.

Each level is read back from the level below in blocks of (chunk x factor) voxels, pooled (mean for
images, max for labels so small structures survive) and stored into chunk-aligned regions, so no two
tasks ever write the same chunk and no level is ever held whole in memory.
"""
from __future__ import annotations

import itertools
from typing import Any, Literal

import dask
import dask.array as da
import numpy as np
from dask.callbacks import Callback

from lsmfm.io import omezarr


def progress_bar(desc: str, enabled: bool = True) -> Any:
    """One bar for a whole multi-step job; each `compute` adds its Dask tasks to the total."""
    from lsmfm.progress import progress_bar as bar

    return bar(desc=desc, unit="task", total=0, enabled=enabled)


class _TaskProgress(Callback):
    def __init__(self, bar: Any, step: str) -> None:
        super().__init__()
        self.bar, self.step = bar, step

    def _start_state(self, dsk: Any, state: dict) -> None:
        if self.bar is not None:
            self.bar.total += sum(len(state[k]) for k in ("ready", "waiting", "running", "finished"))
            self.bar.set_postfix_str(self.step, refresh=True)

    def _posttask(self, key: Any, result: Any, dsk: Any, state: dict, worker_id: Any) -> None:
        if self.bar is not None:
            self.bar.update(1)


def compute(*graphs: Any, bar: Any = None, step: str = "") -> tuple:
    """`dask.compute` on threads (zarr codecs release the GIL), counting its tasks on `bar`."""
    with _TaskProgress(bar, step):
        return dask.compute(*graphs, scheduler="threads")


def store_graph(group: Any, path: str, data: da.Array, chunk: int) -> tuple[da.Array, Any]:
    """Create level `path` and return (data rechunked to its chunks, a lazy store of data into it)."""
    arr = omezarr.create_level(group, path, data.shape, data.dtype, chunk)
    aligned = data.rechunk(arr.chunks)
    return aligned, da.store(aligned, arr, lock=False, compute=False)


def store_level(group: Any, path: str, data: da.Array, chunk: int, bar: Any = None,
                step: str = "") -> None:
    """Write a (C, Z, Y, X) dask array as level `path` of `group`."""
    compute(store_graph(group, path, data, chunk)[1], bar=bar, step=step)


def pool(data: da.Array, factor: tuple[int, int, int], method: Literal["mean", "max"]) -> da.Array:
    """Pool a (C, Z, Y, X) array by `factor` (trailing odd planes dropped), keeping its dtype."""
    trimmed = data[(slice(None),) + tuple(slice(0, s - s % f) for s, f in zip(data.shape[1:], factor))]
    if any(c % f for axis, f in zip(trimmed.chunks[1:], factor) for c in axis):
        trimmed = trimmed.rechunk((1,) + tuple(max(f, axis[0] - axis[0] % f) for axis, f in
                                               zip(trimmed.chunks[1:], factor)))
    pooled = tuple(tuple(c // f for c in axis) for axis, f in zip(trimmed.chunks[1:], factor))
    chunks = (trimmed.chunks[0],) + pooled
    return trimmed.map_blocks(pool_block, factor=factor, method=method, chunks=chunks, dtype=data.dtype)


def pool_block(block: np.ndarray, factor: tuple[int, int, int], method: str) -> np.ndarray:
    """Mean or max over each factor-sized cell of a (C, Z, Y, X) block, from strided views (no copies)."""
    views = [block[(slice(None),) + tuple(slice(o, None, f) for o, f in zip(offset, factor))]
             for offset in itertools.product(*(range(f) for f in factor))]
    if method == "max":
        return np.maximum.reduce(views)
    wide = np.float64 if block.dtype.itemsize > 2 else np.float32
    total = np.zeros(views[0].shape, wide)
    for view in views:
        np.add(total, view, out=total, casting="unsafe")
    total /= len(views)
    if np.issubdtype(block.dtype, np.integer):
        np.rint(total, out=total)
    return total.astype(block.dtype)


def write_pyramid(group: Any, factors: list[tuple[int, int, int]], chunk: int,
                  method: Literal["mean", "max"], bar: Any = None, name: str = "image") -> None:
    """Levels 1..n of `group` from level 0, each pooled from the one below."""
    for level, factor in enumerate(factors, start=1):
        below = group[str(level - 1)]
        blocks = (1,) + tuple(min(chunk * f, s) for f, s in zip(factor, below.shape[1:]))
        source = da.from_zarr(below, chunks=blocks)
        store_level(group, str(level), pool(source, factor, method), chunk, bar, f"{name} level {level}")
