"""The per-patch read: decode the chunk files a box touches straight into the patch.

For the layout `lsmfm ingest` writes (local Zarr v3, regular chunk grid, codecs bytes + blosc) this
skips zarr's asyncio/thread-pool round trips per chunk, which cost more than the decompression itself
for a 96³ patch (~3x slower on 2 cores, see benchmarks/stream.py). Any other layout (sharding, other
codecs, Zarr v2, remote stores) is read through zarr itself: `open_reader` picks.
"""
from __future__ import annotations

import json
from itertools import product
from pathlib import Path
from typing import Any

import numpy as np


class ChunkReader:
    """Reads `reader[index]` (ints and step-1 slices, one per axis) from a bytes+blosc Zarr v3 array.
    It reuses one chunk buffer: one reader per thread (each DataLoader worker opens its own)."""

    def __init__(self, path: Path, meta: dict[str, Any]) -> None:
        from numcodecs import Blosc

        self.path = path
        self.shape = tuple(int(s) for s in meta["shape"])
        self.chunks = tuple(int(c) for c in meta["chunk_grid"]["configuration"]["chunk_shape"])
        endian = meta["codecs"][0].get("configuration", {}).get("endian", "little")
        self.dtype = np.dtype(meta["data_type"]).newbyteorder("<" if endian == "little" else ">")
        self.fill = np.array(meta.get("fill_value", 0), dtype=self.dtype)
        self.separator = meta["chunk_key_encoding"].get("configuration", {}).get("separator", "/")
        self.codec = Blosc()
        self.buffer = np.empty(self.chunks, self.dtype)

    @classmethod
    def supports(cls, meta: dict[str, Any]) -> bool:
        return (meta.get("zarr_format") == 3 and meta.get("chunk_grid", {}).get("name") == "regular"
                and [c["name"] for c in meta.get("codecs", [])] == ["bytes", "blosc"]
                and meta.get("chunk_key_encoding", {}).get("name") == "default"
                and not meta.get("storage_transformers"))

    def __getitem__(self, index: tuple[int | slice, ...]) -> np.ndarray:
        return self.read(index)

    def read(self, index: tuple[int | slice, ...], dtype: Any = None) -> np.ndarray:
        """The selection as a new array of `dtype` (default: the stored one); the conversion happens
        while chunks are copied in, so a uint16 -> float32 patch costs no extra pass."""
        bounds = [_bounds(sel, n) for sel, n in zip(index, self.shape)]
        shape = [hi - lo for (lo, hi), sel in zip(bounds, index) if isinstance(sel, slice)]
        out = np.empty(shape, self.dtype if dtype is None else dtype)
        full = out.reshape([hi - lo for lo, hi in bounds])  # a view with the int axes kept as length 1
        per_axis = [range(lo // c, (hi - 1) // c + 1) for (lo, hi), c in zip(bounds, self.chunks)]
        for key in product(*per_axis):
            src, dst = [], []
            for k, (lo, hi), c in zip(key, bounds, self.chunks):
                a, b = max(lo, k * c), min(hi, (k + 1) * c)
                src.append(slice(a - k * c, b - k * c))
                dst.append(slice(a - lo, b - lo))
            full[tuple(dst)] = self._chunk(key)[tuple(src)]
        return out

    def _chunk(self, key: tuple[int, ...]) -> np.ndarray:
        path = self.path / self.separator.join(["c", *map(str, key)])
        try:
            data = path.read_bytes()
        except FileNotFoundError:  # chunks holding only the fill value are not written
            self.buffer.fill(self.fill)
            return self.buffer
        self.codec.decode(data, out=self.buffer)
        return self.buffer


def _bounds(sel: int | slice, n: int) -> tuple[int, int]:
    if isinstance(sel, slice):
        lo, hi, step = sel.indices(n)
        if step != 1 or hi <= lo:
            raise IndexError(f"only non-empty step-1 slices are supported, got {sel}")
        return lo, hi
    if not -n <= sel < n:
        raise IndexError(f"index {sel} out of range for an axis of length {n}")
    return sel % n, sel % n + 1


def open_reader(path: str | Path) -> Any:
    """A `ChunkReader` when the array's layout allows it, else the zarr array (read-only)."""
    p = Path(path)
    meta_file = p / "zarr.json"
    if meta_file.is_file():
        meta = json.loads(meta_file.read_text())
        if ChunkReader.supports(meta):
            return ChunkReader(p, meta)
    import zarr

    return zarr.open_array(str(p), mode="r")
