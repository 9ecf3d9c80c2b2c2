"""Multiscale pyramids written shard by shard with Dask: memory is a few shards per worker thread.

Each level is written one shard per task: the shard is pooled (mean for images, max for labels so small
structures survive) from the level below one inner chunk at a time, so no two tasks ever write the
same file and a task holds one shard, whatever the pooling factor.
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
    """`dask.compute` on threads (zarr codecs release the GIL), counting its tasks on `bar`; on the
    active `dask.distributed` client instead when there is one (`lsmfm.data.ingest.cluster`)."""
    client = active_client()
    if client is not None:
        return _compute_on(client, graphs, bar, step)
    with _TaskProgress(bar, step):
        return dask.compute(*graphs, scheduler="threads")


def active_client() -> Any:
    """The default `dask.distributed` client of this process, or None (distributed is never imported
    here: without it, there is no client)."""
    import sys

    if "distributed" not in sys.modules:
        return None
    from distributed import default_client

    try:
        return default_client()
    except ValueError:
        return None


def _compute_on(client: Any, graphs: tuple, bar: Any, step: str) -> tuple:
    """The same graphs on the cluster (its dashboard shows the tasks); the bar counts steps."""
    if bar is not None:
        bar.total += 1
        bar.set_postfix_str(f"{step} (on {client.scheduler.address})", refresh=True)
    result = dask.compute(*graphs, scheduler=client)
    if bar is not None:
        bar.update(1)
    return result


def store_graph(group: Any, path: str, data: da.Array, chunk: int, shard: int) -> tuple[da.Array, Any]:
    """Create level `path` and return (data rechunked to its shards, a lazy store of data into it): one
    task per shard, so no two tasks write the same file."""
    arr = omezarr.create_level(group, path, data.shape, data.dtype, chunk, shard)
    aligned = data.rechunk(omezarr.write_unit(arr))
    return aligned, da.store(aligned, arr, lock=False, compute=False)


def store_level(group: Any, path: str, data: da.Array, chunk: int, shard: int, bar: Any = None,
                step: str = "") -> None:
    """Write a (C, Z, Y, X) dask array as level `path` of `group`."""
    compute(store_graph(group, path, data, chunk, shard)[1], bar=bar, step=step)


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


def shard_regions(shape: tuple[int, ...], unit: tuple[int, ...]) -> list[tuple[slice, ...]]:
    """The regions of an array's shards (or chunks), C order: one writer each."""
    grid = [range(-(-s // u)) for s, u in zip(shape, unit)]
    return [tuple(slice(k * u, min((k + 1) * u, s)) for k, u, s in zip(key, unit, shape))
            for key in itertools.product(*grid)]


def pool_shard(below: Any, target: Any, region: tuple[slice, ...], factor: tuple[int, int, int],
               method: str) -> None:
    """Write one shard `region` of `target`, pooled (mean, or max for labels) from `below` (a reader
    with `read`) one inner chunk at a time: memory is the shard plus a chunk's source, whatever the
    factor."""
    out = np.empty(tuple(r.stop - r.start for r in region), target.dtype)
    for piece in shard_regions(out.shape, (out.shape[0],) + tuple(target.chunks[1:])):
        absolute = tuple(slice(r.start + p.start, r.start + p.stop) for r, p in zip(region, piece))
        source = (absolute[0],) + tuple(slice(a.start * f, a.stop * f) for a, f in zip(absolute[1:], factor))
        out[piece] = pool_block(below.read(source), factor, method)
    target[region] = out


def _pool_task(below_path: str, target_path: str, region: tuple[slice, ...], factor: tuple[int, int, int],
               method: str) -> None:
    from lsmfm.io.chunk_reader import open_reader

    pool_shard(open_reader(below_path), omezarr.open_level(target_path), region, factor, method)


def write_pyramid(group: Any, factors: list[tuple[int, int, int]], chunk: int, shard: int,
                  method: Literal["mean", "max"], bar: Any = None, name: str = "image") -> None:
    """Levels 1..n of `group` from level 0, each pooled from the one below: one task per shard."""
    for level, factor in enumerate(factors, start=1):
        below = group[str(level - 1)]
        pooled = (below.shape[0],) + tuple(s // f for s, f in zip(below.shape[1:], factor))
        target = omezarr.create_level(group, str(level), pooled, below.dtype, chunk, shard)
        source, path = str(omezarr.local_path(below)), str(omezarr.local_path(target))
        tasks = [dask.delayed(_pool_task)(source, path, region, factor, method)
                 for region in shard_regions(pooled, omezarr.write_unit(target))]
        compute(*tasks, bar=bar, step=f"{name} level {level}")
