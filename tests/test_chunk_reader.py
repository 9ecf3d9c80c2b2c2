"""The per-region reader: plain and sharded stores read by the fast path equal zarr's reads; it reads
only the inner chunks a region touches; lost and corrupt chunks are reported by file path."""
from __future__ import annotations

import os

import numpy as np
import pytest
import zarr
from zarr.codecs import BloscCodec

from lsmfm.io.chunk_reader import ChunkReader, ZarrReader, as_dask, open_reader
from lsmfm.io.chunks import ArrayLayout, ChunkError
from lsmfm.io.omezarr import create_level

REGIONS = [(1, slice(0, 21), slice(0, 30), slice(0, 17)), (0, slice(3, 12), slice(7, 25), slice(5, 6)),
           (0, slice(0, 9), slice(0, 9), slice(0, 9)), (slice(0, 2), slice(20, 21), slice(1, 2), slice(16, 17))]


def _data() -> np.ndarray:
    data = np.random.default_rng(0).integers(0, 60000, (2, 21, 30, 17)).astype(np.uint16)
    data[:, :8, :8, :8] = 7  # a chunk holding only the fill value
    return data


@pytest.mark.parametrize("shards", [None, (1, 16, 16, 16), (2, 24, 32, 24)])
def test_fast_reads_equal_zarr_reads(tmp_path, shards):
    data = _data()
    arr = zarr.create_array(str(tmp_path / "a"), shape=data.shape, chunks=(1, 8, 8, 8), shards=shards,
                            dtype="u2", fill_value=7, compressors=BloscCodec(cname="zstd", shuffle="bitshuffle"))
    arr[:] = data
    reader = open_reader(tmp_path / "a")
    assert isinstance(reader, ChunkReader) and reader.layout.sharded == (shards is not None)
    assert not reader.layout.every_chunk_written  # zarr's default: chunks of fill values are not stored
    for index in REGIONS:
        np.testing.assert_array_equal(reader[index], data[index])
        np.testing.assert_array_equal(reader[index], arr[index])
    as_float = reader.read((0, slice(3, 12), slice(7, 25), slice(5, 17)), np.float32)
    assert as_float.dtype == np.float32 and np.array_equal(as_float, data[0, 3:12, 7:25, 5:17])
    lazy = as_dask(tmp_path / "a", data.shape, data.dtype, (1, 16, 16, 16))
    np.testing.assert_array_equal(lazy.compute(scheduler="threads"), data)


def test_sharded_read_touches_only_the_inner_chunks_of_the_region(tmp_path, monkeypatch):
    data = _data()
    arr = zarr.create_array(str(tmp_path / "a"), shape=data.shape, chunks=(1, 8, 8, 8), shards=(2, 24, 32, 24),
                            dtype="u2", compressors=BloscCodec(cname="zstd"))
    arr[:] = data
    reads = []
    real = os.pread

    def counting(fd, n, offset):
        reads.append(n)
        return real(fd, n, offset)

    monkeypatch.setattr("lsmfm.io.chunks.os.pread", counting)
    monkeypatch.setattr("lsmfm.io.chunk_reader.os.pread", counting)
    reader = open_reader(tmp_path / "a")
    np.testing.assert_array_equal(reader[0, 9:15, 9:15, 9:15], data[0, 9:15, 9:15, 9:15])
    index_bytes = 16 * (2 * 3 * 4 * 3) + 4
    assert reads[0] == index_bytes and len(reads) == 2  # the shard index, then one inner chunk
    reads.clear()
    reader[0, 0:4, 0:4, 0:4]
    assert len(reads) == 1  # the index is kept


def test_other_layouts_are_read_through_zarr(tmp_path):
    zarr.create_array(str(tmp_path / "b"), shape=(4, 4), chunks=(2, 2), dtype="f4", zarr_format=2)
    reader = open_reader(tmp_path / "b")
    assert isinstance(reader, ZarrReader) and reader[0:2, 0:4].shape == (2, 4)
    assert ArrayLayout.open(tmp_path / "nothing") is None


def _lsmfm_level(path, shard):
    group = zarr.open_group(str(path), mode="w", zarr_format=3)
    level = create_level(group, "0", (1, 40, 40, 40), "uint16", 16, shard)
    level[:] = np.arange(40 ** 3, dtype=np.uint16).reshape(1, 40, 40, 40) % 5  # zeros: chunks are stored too
    level[0, :16, :16, :16] = 0
    return path / "0"


@pytest.mark.parametrize("shard", [1, 2])
def test_a_lost_chunk_of_an_lsmfm_array_is_an_error_naming_the_file(tmp_path, shard):
    level = _lsmfm_level(tmp_path / "s.zarr", shard)
    reader = open_reader(level)
    assert reader.layout.every_chunk_written
    assert reader[0, 0:16, 0:16, 0:16].max() == 0  # an empty chunk, stored: fine
    lost = level / "c/0/0/0/0"
    assert lost.is_file()
    lost.unlink()
    with pytest.raises(ChunkError, match=f"{lost}: missing (chunk|shard): every chunk of this array was written"):
        open_reader(level)[0, 0:4, 0:4, 0:4]


def test_a_corrupt_chunk_is_an_error_naming_the_file(tmp_path):
    level = _lsmfm_level(tmp_path / "plain.zarr", 1)
    bad = level / "c/0/1/0/0"
    bad.write_bytes(bytes(len(bad.read_bytes())))
    with pytest.raises(ChunkError, match=f"{bad}: corrupt chunk: cannot decompress"):
        open_reader(level)[0, 16:20, 0:4, 0:4]


def test_corrupt_shards_are_named(tmp_path):
    level = _lsmfm_level(tmp_path / "sharded.zarr", 2)
    shard = level / "c/0/0/0/0"
    raw = bytearray(shard.read_bytes())
    raw[-30] ^= 0xFF  # inside the index: its checksum no longer matches
    shard.write_bytes(bytes(raw))
    with pytest.raises(ChunkError, match=f"{shard}: corrupt shard: the checksum of its chunk index"):
        open_reader(level)[0, 0:4, 0:4, 0:4]
    raw[-30] ^= 0xFF
    raw[10] ^= 0xFF  # inside the first inner chunk's bytes
    shard.write_bytes(bytes(raw))
    with pytest.raises(ChunkError, match=f"{shard} \\(inner chunk \\(0, 0, 0, 0\\)\\): corrupt chunk"):
        open_reader(level)[0, 0:4, 0:4, 0:4]
    shard.write_bytes(bytes(raw[:100]))  # truncated
    with pytest.raises(ChunkError, match=f"{shard}: corrupt shard"):
        open_reader(level)[0, 0:4, 0:4, 0:4]
