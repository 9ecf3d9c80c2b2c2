"""Where the chunks of a local Zarr v3 array live on disk, and how to decode one, with or without sharding.

An array's stored objects are its chunk files or, with the `sharding_indexed` codec, its shard files:
each shard holds inner chunks (encoded one after the other) and, at its end, an index of (offset,
length) per inner chunk (uint64 little endian, C order, then a crc32c of the index); an inner chunk
never written has offset = length = 2^64 - 1. lsmfm decodes chunks itself for the layouts its writers
use (`bytes` + `blosc`) and the common others (`bytes` alone or with `zstd`, zarr's default, or `gzip`),
reading a shard's index and then only the bytes of the inner chunks a region touches;
`ArrayLayout.parse` returns None for anything else, and callers fall back to zarr.

Arrays lsmfm writes carry `attributes["lsmfm"]["every_chunk_written"] = true`: every chunk is stored,
empty or not, so an absent chunk or shard file is a lost one, never a legitimately empty one.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from itertools import product
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from lsmfm.errors import InputError

EMPTY = 2**64 - 1
EVERY_CHUNK_WRITTEN = "every_chunk_written"


class ChunkError(InputError):
    """A chunk that should exist is missing, or cannot be decoded; the message names its file."""


@dataclass(frozen=True)
class ArrayLayout:
    """The on-disk layout of one local Zarr v3 array with `bytes` + `blosc` chunks (optionally sharded).

    `chunks` is the decoding unit (the inner chunk when sharded); `objects` the stored file's shape.
    """

    path: Path
    shape: tuple[int, ...]
    dtype: np.dtype
    chunks: tuple[int, ...]
    objects: tuple[int, ...]
    fill: Any
    separator: str
    sharded: bool
    every_chunk_written: bool
    compressor: str  # "blosc", "zstd", "gzip" or "" (none)

    @classmethod
    def open(cls, path: str | Path) -> "ArrayLayout | None":
        """The layout of the array at `path`, or None when it is not a local v3 array lsmfm can decode."""
        meta_file = Path(path) / "zarr.json"
        try:
            meta = json.loads(meta_file.read_text())
        except (OSError, ValueError):
            return None
        return cls.parse(Path(path), meta)

    @classmethod
    def parse(cls, path: Path, meta: dict[str, Any]) -> "ArrayLayout | None":
        if (meta.get("zarr_format") != 3 or meta.get("node_type") != "array"
                or meta.get("chunk_grid", {}).get("name") != "regular"
                or meta.get("chunk_key_encoding", {}).get("name") != "default"
                or meta.get("storage_transformers")):
            return None
        codecs = meta.get("codecs", [])
        outer = tuple(int(c) for c in meta["chunk_grid"]["configuration"]["chunk_shape"])
        sharded = [c.get("name") for c in codecs] == ["sharding_indexed"]
        if sharded:
            conf = codecs[0].get("configuration", {})
            if (conf.get("index_location", "end") != "end"
                    or [c.get("name") for c in conf.get("index_codecs", [])] != ["bytes", "crc32c"]):
                return None
            codecs, inner = conf.get("codecs", []), tuple(int(c) for c in conf["chunk_shape"])
        else:
            inner = outer
        names = [c.get("name") for c in codecs]
        if names[:1] != ["bytes"] or len(names) > 2 or names[1:] not in ([], ["blosc"], ["zstd"], ["gzip"]):
            return None
        endian = codecs[0].get("configuration", {}).get("endian", "little")
        dtype = np.dtype(meta["data_type"]).newbyteorder("<" if endian == "little" else ">")
        attrs = meta.get("attributes", {}).get("lsmfm", {})
        return cls(path, tuple(int(s) for s in meta["shape"]), dtype, inner, outer,
                   np.array(meta.get("fill_value", 0), dtype=dtype),
                   meta["chunk_key_encoding"].get("configuration", {}).get("separator", "/"), sharded,
                   bool(attrs.get(EVERY_CHUNK_WRITTEN, False)), (names[1:] or [""])[0])

    @property
    def per_object(self) -> tuple[int, ...]:
        """Inner chunks per stored object along each axis (all 1 without sharding)."""
        return tuple(o // c for o, c in zip(self.objects, self.chunks))

    @property
    def object_grid(self) -> tuple[int, ...]:
        return tuple(math.ceil(s / o) for s, o in zip(self.shape, self.objects))

    def object_keys(self) -> Iterator[tuple[int, ...]]:
        return product(*(range(n) for n in self.object_grid))

    def object_path(self, key: tuple[int, ...]) -> Path:
        return self.path / self.separator.join(["c", *map(str, key)])

    def empty_chunk(self) -> np.ndarray:
        return np.full(self.chunks, self.fill, self.dtype)


class ShardIndex:
    """The (offset, length) table of one shard file, read once and checked against its crc32c."""

    def __init__(self, layout: ArrayLayout, path: Path, fd: int) -> None:
        import google_crc32c

        n = math.prod(layout.per_object)
        size = os.fstat(fd).st_size
        nbytes = 16 * n + 4
        if size < nbytes:
            raise ChunkError(path, f"corrupt shard: {size} bytes, shorter than its {nbytes}-byte index")
        raw = os.pread(fd, nbytes, size - nbytes)
        if google_crc32c.value(raw[:-4]).to_bytes(4, "little") != raw[-4:]:
            raise ChunkError(path, "corrupt shard: the checksum of its chunk index does not match")
        self.table = np.frombuffer(raw[:-4], "<u8").reshape(*layout.per_object, 2)
        self.data_end = size - nbytes
        valid = self.table[..., 0] != EMPTY
        if np.any(self.table[valid, 0] + self.table[valid, 1] > self.data_end):
            raise ChunkError(path, "corrupt shard: its index points past the end of the chunk data "
                                   "(truncated file?)")

    def entry(self, inner: tuple[int, ...]) -> tuple[int, int] | None:
        offset, length = (int(v) for v in self.table[inner])
        return None if offset == EMPTY else (offset, length)


class ChunkDecoder:
    """Decodes chunks of one layout into a reused buffer (one decoder per thread)."""

    def __init__(self, layout: ArrayLayout) -> None:
        import numcodecs

        self.layout = layout
        names = {"blosc": "blosc", "zstd": "zstd", "gzip": "gzip"}
        self.codec = numcodecs.get_codec({"id": names[layout.compressor]}) if layout.compressor else None
        self.buffer = np.empty(layout.chunks, layout.dtype)

    def decode(self, data: bytes, where: str) -> np.ndarray:
        try:
            if self.codec is None:
                self.buffer.reshape(-1)[:] = np.frombuffer(data, self.layout.dtype)
            else:
                self.codec.decode(data, out=self.buffer)
        except Exception as exc:  # numcodecs raises RuntimeError/ValueError/TypeError on bad bytes
            raise ChunkError(where, f"corrupt chunk: cannot decompress its {len(data)} bytes ({exc})") from exc
        return self.buffer

    def fill(self) -> np.ndarray:
        self.buffer.fill(self.layout.fill)
        return self.buffer


def missing(layout: ArrayLayout, where: str | Path, inner: tuple[int, ...] | None = None) -> ChunkError:
    """The error for a chunk that should exist (`every_chunk_written`) but does not."""
    what = f"inner chunk {inner} of shard" if inner is not None else ("shard" if layout.sharded else "chunk")
    return ChunkError(where, f"missing {what}: every chunk of this array was written, so the data here was "
                             "deleted or lost; re-create the store (re-run `lsmfm ingest`) or restore the file")
