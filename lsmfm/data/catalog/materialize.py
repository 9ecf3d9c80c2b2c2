"""Materialise a catalog: ingest every entry whose store is missing from its `source`.

A single-image entry (store `*.zarr`) is one `ingest` of its source file(s) and label sources; a
collection entry becomes one image per volume file of its source folder. Every entry is planned (and
its sources and targets checked) before anything is written; finished images are kept, so an
interrupted run simply continues where it stopped. Nothing lsmfm did not write is ever deleted: a
target in the way that is not a finished image is refused unless `--overwrite`, and of leftover
`<store>.partial` folders only lsmfm's own (marked, `lsmfm.io.lock`) are removed.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


from lsmfm.data.catalog.entries import CatalogEntry, collection_sources, load_catalog, volume_stem
from lsmfm.data.ingest.convert import check_target, ingest
from lsmfm.errors import InputError
from lsmfm.io import omezarr
from lsmfm.io.omezarr import SHARD_CHUNKS


@dataclass
class Job:
    """One image to write: its source files (channels), target store and label sources."""

    sources: list[Path]
    out: Path
    labels: dict[str, Path] = field(default_factory=dict)


def ingest_catalog(path: str | Path, overwrite: bool = False, progress: bool = True,
                   shard: int = SHARD_CHUNKS) -> list[dict[str, Any]]:
    """Ingest the missing stores of every entry; one row per entry: id, store, written, kept."""
    entries = load_catalog(path)
    plans = [(e, *plan_entry(e, overwrite)) for e in entries]
    return [{"id": e.id, "store": str(e.store_path), "written": _run(e, jobs, overwrite, progress, shard),
             "kept": kept} for e, jobs, kept in plans]


def ingest_entry(entry: CatalogEntry, overwrite: bool = False, progress: bool = True,
                 shard: int = SHARD_CHUNKS) -> dict[str, int]:
    """Ingest one entry's missing images: {'written': n, 'kept': m}."""
    jobs, kept = plan_entry(entry, overwrite)
    return {"written": _run(entry, jobs, overwrite, progress, shard), "kept": kept}


def plan_entry(entry: CatalogEntry, overwrite: bool = False) -> tuple[list[Job], int]:
    """The images still to write for `entry` and how many finished ones are kept; sources are checked
    here, and so is every target: anything in the way that is not a finished image (a user's array, a
    folder of other files) is refused unless `overwrite`, never deleted."""
    store = entry.store_path
    if not entry.is_collection:
        if omezarr.is_complete_image(store) and not overwrite:
            return [], 1
        _check_sources(entry)
        jobs = [Job(entry.source_paths, store, entry.label_source_paths)]
    else:
        if not entry.source:
            return [], len(entry.images())
        _check_sources(entry)
        every = [Job([f], store / f"{volume_stem(f)}.zarr") for f in collection_sources(entry.source_paths[0])]
        jobs = [j for j in every if overwrite or not omezarr.is_complete_image(j.out)]
        if store.exists() and not store.is_dir():
            raise InputError(store, f"catalog entry {entry.id!r}: a collection store must be a folder")
    for job in jobs:
        _check_target(entry, job.out, overwrite)
    return jobs, (0 if not entry.is_collection else len(every) - len(jobs))


def _check_target(entry: CatalogEntry, out: Path, overwrite: bool) -> None:
    try:
        check_target(out, overwrite)
    except InputError as exc:
        raise InputError(out, f"catalog entry {entry.id!r}: exists and was not written by lsmfm (not a finished "
                              "OME-Zarr image); move it away, point `store` elsewhere, or pass --overwrite to "
                              "replace it") from exc


def _run(entry: CatalogEntry, jobs: list[Job], overwrite: bool, progress: bool, shard: int) -> int:
    single = len(jobs) == 1 and not entry.is_collection
    from lsmfm.progress import progress_bar

    for job in progress_bar(jobs, desc=f"ingest {entry.id}", unit="image", enabled=progress and not single):
        ingest(job.sources, job.out, labels=job.labels, overwrite=overwrite, progress=progress and single,
               shard=shard)
    return len(jobs)


def _check_sources(entry: CatalogEntry) -> None:
    store = entry.store_path
    if not entry.source:
        raise InputError(store, f"catalog entry {entry.id!r}: store is missing and the entry has no `source`")
    for p in entry.source_paths + list(entry.label_source_paths.values()):
        if not p.exists():
            raise InputError(p, f"catalog entry {entry.id!r}: source does not exist")
    if entry.is_collection:
        if len(entry.source) != 1 or not entry.source_paths[0].is_dir():
            raise InputError(store, f"catalog entry {entry.id!r}: a collection store needs one source folder")
        if not collection_sources(entry.source_paths[0]):
            raise InputError(entry.source_paths[0], f"catalog entry {entry.id!r}: no volume files in it")
        if entry.label_sources:
            raise InputError(store, f"catalog entry {entry.id!r}: label_sources need a *.zarr store")
