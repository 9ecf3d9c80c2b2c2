"""Deep check of a store: read and decode every chunk of every array, and list the lost and corrupt ones
by file path (`lsmfm catalog validate --deep`).

A chunk file (or inner chunk of a shard) that is absent is lost when the array's writer stored every
chunk (`lsmfm.io.chunks`); otherwise it is counted as unwritten (zarr's fill value). Arrays in layouts
lsmfm cannot decode itself are read region by region through zarr, which finds corrupt chunks but cannot
tell a lost chunk from an empty one.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from itertools import product
from pathlib import Path
from typing import Any, Iterator

from lsmfm.io.chunks import ArrayLayout, ChunkDecoder, ChunkError, ShardIndex, missing


@dataclass
class ArrayCheck:
    """What a deep read of one array found."""

    path: Path
    chunks: int = 0
    unwritten: int = 0
    problems: list[str] = field(default_factory=list)  # "PATH: problem", one per lost or corrupt chunk


def check_store(path: str | Path, progress: bool = False) -> list[ArrayCheck]:
    """Every array under the Zarr store `path` (image levels, label images), deep-checked."""
    from tqdm.auto import tqdm

    arrays = sorted(p.parent for p in Path(path).rglob("zarr.json") if _is_array(p))
    arrays += sorted(p.parent for p in Path(path).rglob(".zarray"))
    return [check_array(a) for a in tqdm(arrays, desc=f"check {Path(path).name}", unit="array",
                                         disable=not progress)]


def check_array(path: str | Path) -> ArrayCheck:
    """Decode every chunk of the array at `path`."""
    layout = ArrayLayout.open(path)
    result = ArrayCheck(Path(path))
    if layout is None:
        _check_with_zarr(Path(path), result)
        return result
    decoder = ChunkDecoder(layout)
    for key in layout.object_keys():
        for problem in _check_object(layout, decoder, key, result):
            result.problems.append(str(problem))
    return result


def _check_object(layout: ArrayLayout, decoder: ChunkDecoder, key: tuple[int, ...], result: ArrayCheck
                  ) -> Iterator[ChunkError]:
    path = layout.object_path(key)
    inner = math.prod(layout.per_object)
    result.chunks += inner
    if not path.is_file():
        if layout.every_chunk_written:
            yield missing(layout, path)
        else:
            result.unwritten += inner
        return
    if not layout.sharded:
        try:
            decoder.decode(path.read_bytes(), str(path))
        except ChunkError as exc:
            yield exc
        return
    with open(path, "rb") as fh:
        try:
            index = ShardIndex(layout, path, fh.fileno())
        except ChunkError as exc:
            yield exc
            return
        for local in product(*(range(n) for n in layout.per_object)):
            entry = index.entry(local)
            if entry is None:
                if layout.every_chunk_written and _inside(layout, key, local):
                    yield missing(layout, path, local)
                else:
                    result.unwritten += 1
                continue
            try:
                decoder.decode(os.pread(fh.fileno(), entry[1], entry[0]), f"{path} (inner chunk {local})")
            except ChunkError as exc:
                yield exc


def _inside(layout: ArrayLayout, key: tuple[int, ...], local: tuple[int, ...]) -> bool:
    """False for inner chunks of an edge shard that lie wholly outside the array (never written)."""
    return all((k * p + i) * c < s for k, p, i, c, s in zip(key, layout.per_object, local, layout.chunks,
                                                              layout.shape))


def _check_with_zarr(path: Path, result: ArrayCheck) -> None:
    import zarr

    array = zarr.open_array(str(path), mode="r")
    unit = tuple(array.shards or array.chunks)
    for key in product(*(range(math.ceil(s / u)) for s, u in zip(array.shape, unit))):
        region = tuple(slice(k * u, min((k + 1) * u, s)) for k, u, s in zip(key, unit, array.shape))
        result.chunks += 1
        try:
            array[region]
        except Exception as exc:  # any codec or store failure is a corrupt chunk
            result.problems.append(f"{path} region {[(r.start, r.stop) for r in region]}: cannot read: "
                                   f"{type(exc).__name__}: {exc}")


def _is_array(meta: Path) -> bool:
    import json

    try:
        return json.loads(meta.read_text()).get("node_type") == "array"
    except (OSError, ValueError):
        return False


def summarize(checks: list[ArrayCheck]) -> dict[str, Any]:
    """Totals over a store's arrays: chunks read, unwritten, and every problem."""
    return {"arrays": len(checks), "chunks": sum(c.chunks for c in checks),
            "unwritten": sum(c.unwritten for c in checks),
            "problems": [p for c in checks for p in c.problems]}
