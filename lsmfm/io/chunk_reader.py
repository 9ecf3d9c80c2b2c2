"""The per-region read: decode only the chunks a box touches, straight into the result.

For the layout lsmfm writes (`lsmfm.io.chunks`: local Zarr v3, bytes + blosc, plain or sharded) this
skips zarr's asyncio/thread-pool round trips per chunk, which cost more than the decompression itself
for a 96³ patch (see benchmarks/stream.py). In a sharded array it reads each shard's index once (then
keeps it) and only the bytes of the inner chunks the box touches. A missing chunk of an array whose
writer stored every chunk, and a chunk that does not decode, raise `ChunkError` naming the file. Any
other layout (other codecs, Zarr v2, remote stores) is read through zarr: `open_reader` picks.
"""
from __future__ import annotations

import os
import threading
from collections import OrderedDict
from itertools import product
from pathlib import Path
from typing import Any

import numpy as np

from lsmfm.errors import InputError
from lsmfm.io.chunks import ArrayLayout, ChunkDecoder, ChunkError, ShardIndex, missing

INDEX_CACHE = 256  # shard indices kept per reader (a few KiB each)


class ChunkReader:
    """Reads `reader[index]` (ints and step-1 slices, one per axis) of one array. It reuses one chunk
    buffer: one reader per thread (each DataLoader worker opens its own)."""

    def __init__(self, layout: ArrayLayout, witness: Witness | None = None) -> None:
        self.layout = layout
        self.path = layout.path
        self.shape, self.dtype, self.fill = layout.shape, layout.dtype, layout.fill
        self.decoder = ChunkDecoder(layout)
        self.indices: OrderedDict[tuple[int, ...], ShardIndex | None] = OrderedDict()
        self.witness = witness

    def __getitem__(self, index: tuple[int | slice, ...]) -> np.ndarray:
        return self.read(index)

    def read(self, index: tuple[int | slice, ...], dtype: Any = None) -> np.ndarray:
        """The selection as a new array of `dtype` (default: the stored one); the conversion happens
        while chunks are copied in, so a uint16 -> float32 patch costs no extra pass."""
        chunks = self.layout.chunks
        bounds = [_bounds(sel, n) for sel, n in zip(index, self.shape)]
        shape = [hi - lo for (lo, hi), sel in zip(bounds, index) if isinstance(sel, slice)]
        out = np.empty(shape, self.dtype if dtype is None else dtype)
        full = out.reshape([hi - lo for lo, hi in bounds])  # a view with the int axes kept as length 1
        per_axis = [range(lo // c, (hi - 1) // c + 1) for (lo, hi), c in zip(bounds, chunks)]
        for key in product(*per_axis):
            src, dst = [], []
            for k, (lo, hi), c in zip(key, bounds, chunks):
                a, b = max(lo, k * c), min(hi, (k + 1) * c)
                src.append(slice(a - k * c, b - k * c))
                dst.append(slice(a - lo, b - lo))
            full[tuple(dst)] = self.chunk(key)[tuple(src)]
        return out

    def chunk(self, key: tuple[int, ...]) -> np.ndarray:
        """Decoded chunk `key` (inner chunk coordinates), in the reader's reused buffer."""
        layout = self.layout
        if not layout.sharded:
            path = layout.object_path(key)
            try:
                data = path.read_bytes()
            except FileNotFoundError:
                return self._absent(key, path)
            return self.decoder.decode(data, str(path))
        per = layout.per_object
        shard = tuple(k // p for k, p in zip(key, per))
        inner = tuple(k % p for k, p in zip(key, per))
        path = layout.object_path(shard)
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            return self._absent(key, path)
        try:
            index = self._index(shard, path, fd)
            entry = index.entry(inner)
            if entry is None:
                return self._absent(key, path, inner)
            data = os.pread(fd, entry[1], entry[0])
        finally:
            os.close(fd)
        return self.decoder.decode(data, f"{path} (inner chunk {inner})")

    def _index(self, shard: tuple[int, ...], path: Path, fd: int) -> ShardIndex:
        index = self.indices.get(shard)
        if index is None:
            index = self.indices[shard] = ShardIndex(self.layout, path, fd)
            if len(self.indices) > INDEX_CACHE:
                self.indices.popitem(last=False)
        else:
            self.indices.move_to_end(shard)
        return index

    def _absent(self, key: tuple[int, ...], path: Path, inner: tuple[int, ...] | None = None) -> np.ndarray:
        """An unwritten chunk holds the fill value, unless the writer stored every chunk, or a coarser
        level of the pyramid has data there: then it is lost."""
        if self.layout.every_chunk_written:
            raise missing(self.layout, path, inner)
        if self.witness is not None and self.witness.has_data(key, self.layout):
            raise ChunkError(path, f"missing chunk: the coarser level {self.witness.path.name!r} holds data in "
                                   "its region, so the file was deleted or lost (not an empty chunk); restore "
                                   "it or re-create the store")
        return self.decoder.fill()


class Witness:
    """A coarser pyramid level that tells a lost chunk from an empty one in a store whose writer left
    empty chunks unwritten (zarr's default): a chunk of fill values pools to fill values, so coarse data
    inside the chunk's region means the chunk had data. The region's outer `margin` coarse voxels are
    skipped, since smoothing downsamplers (ome-zarr-py's resize) blend neighbouring chunks into them."""

    def __init__(self, path: str | Path, factors: tuple[int, ...], margin: int = 2) -> None:
        self.path, self.factors, self.margin = Path(path), tuple(factors), margin
        self._reader: ChunkReader | ZarrReader | None = None

    def has_data(self, key: tuple[int, ...], layout: ArrayLayout) -> bool:
        if self._reader is None:
            self._reader = open_reader(self.path)
        index = []
        for k, c, n, f, m in zip(key, layout.chunks, layout.shape, self.factors, self._reader.shape):
            lo, hi = k * c, min((k + 1) * c, n)
            margin = self.margin if f > 1 else 0
            a, b = -(-lo // f) + margin, min(hi // f, m) - margin
            if b <= a:
                return False  # too small a region to tell
            index.append(slice(a, b))
        region = self._reader.read(tuple(index))
        return bool(np.any(region != np.asarray(self._reader.fill, region.dtype)))


class ZarrReader:
    """The zarr fallback with the same `read`: errors name the array and the region."""

    def __init__(self, path: Path) -> None:
        import zarr

        self.path = path
        self.array = zarr.open_array(str(path), mode="r")
        self.shape, self.dtype = tuple(self.array.shape), self.array.dtype
        self.fill = self.array.fill_value if self.array.fill_value is not None else 0

    def __getitem__(self, index: tuple[int | slice, ...]) -> np.ndarray:
        return self.read(index)

    def read(self, index: tuple[int | slice, ...], dtype: Any = None) -> np.ndarray:
        try:
            data = self.array[index]
        except Exception as exc:  # codec and store errors of every kind
            raise InputError(self.path, f"cannot read region {_describe(index)}: {type(exc).__name__}: "
                                        f"{exc}") from exc
        return np.asarray(data, dtype=dtype)


def _describe(index: tuple[int | slice, ...]) -> str:
    return "[" + ", ".join(f"{s.start}:{s.stop}" if isinstance(s, slice) else str(s) for s in index) + "]"


def _bounds(sel: int | slice, n: int) -> tuple[int, int]:
    if isinstance(sel, slice):
        lo, hi, step = sel.indices(n)
        if step != 1 or hi <= lo:
            raise IndexError(f"only non-empty step-1 slices are supported, got {sel}")
        return lo, hi
    if not -n <= sel < n:
        raise IndexError(f"index {sel} out of range for an axis of length {n}")
    return sel % n, sel % n + 1


def open_reader(path: str | Path, witness: Witness | None = None) -> ChunkReader | ZarrReader:
    """A `ChunkReader` when the array's layout allows it, else zarr (read-only) behind the same `read`."""
    layout = ArrayLayout.open(path)
    return ChunkReader(layout, witness) if layout is not None else ZarrReader(Path(path))


class Reopened:
    """An array-like for Dask that keeps only what reopens its source (path, shape, dtype), so it pickles
    to `dask.distributed` workers; each process (and thread) opens the source itself, on first read."""

    def __init__(self, path: str | Path, shape: tuple[int, ...], dtype: Any) -> None:
        self.path, self.shape, self.dtype = str(path), tuple(int(s) for s in shape), np.dtype(dtype)
        self.ndim = len(self.shape)
        self._local = threading.local()

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "_local"}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._local = threading.local()

    def __getitem__(self, index: tuple) -> np.ndarray:
        source = getattr(self._local, "source", None)
        if source is None:
            source = self._local.source = self._open()
        return self._read(source, index)

    def _open(self) -> Any:
        raise NotImplementedError

    def _read(self, source: Any, index: tuple) -> np.ndarray:
        return np.asarray(source[index])


class ReaderArray(Reopened):
    """A Zarr array read through `open_reader` (lost and corrupt chunks named by file)."""

    def __init__(self, path: str | Path, shape: tuple[int, ...], dtype: Any,
                 witness: tuple[str, tuple[int, ...]] | None = None) -> None:
        super().__init__(path, shape, dtype)
        self.witness = witness

    def _open(self) -> ChunkReader | ZarrReader:
        return open_reader(self.path, Witness(*self.witness) if self.witness else None)

    def _read(self, source: Any, index: tuple) -> np.ndarray:
        return source.read(tuple(index))


def as_dask(path: str | Path, shape: tuple[int, ...], dtype: Any, chunks: tuple[int, ...],
            witness: tuple[str, tuple[int, ...]] | None = None) -> Any:
    """The Zarr array at `path` as a Dask array of `chunks`-sized blocks, each read by `open_reader`;
    `witness` = (coarser level's path, pooling factor per axis), see `Witness`."""
    import dask.array as da

    return da.from_array(ReaderArray(path, shape, dtype, witness), chunks=chunks, asarray=True, fancy=False,
                         meta=np.empty((0,) * len(shape), dtype))
