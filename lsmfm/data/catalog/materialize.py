"""Materialise a catalog: ingest every entry whose store is missing from its `source`.

A single-image entry (store `*.zarr`) is one `ingest` of its source file(s) and label sources; a
collection entry becomes one image per volume file of its source folder. Every entry is planned (and
its sources checked) before anything is written; finished images are kept, so an interrupted run
simply continues where it stopped.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


from lsmfm.data.catalog.entries import CatalogEntry, collection_sources, load_catalog, volume_stem
from lsmfm.data.ingest.convert import ingest
from lsmfm.errors import InputError
from lsmfm.io import omezarr


@dataclass
class Job:
    """One image to write: its source files (channels), target store and label sources."""

    sources: list[Path]
    out: Path
    labels: dict[str, Path] = field(default_factory=dict)


def ingest_catalog(path: str | Path, overwrite: bool = False, progress: bool = True) -> list[dict[str, Any]]:
    """Ingest the missing stores of every entry; one row per entry: id, store, written, kept."""
    entries = load_catalog(path)
    plans = [(e, *plan_entry(e, overwrite)) for e in entries]
    return [{"id": e.id, "store": str(e.store_path), "written": _run(e, jobs, progress), "kept": kept}
            for e, jobs, kept in plans]


def ingest_entry(entry: CatalogEntry, overwrite: bool = False, progress: bool = True) -> dict[str, int]:
    """Ingest one entry's missing images: {'written': n, 'kept': m}."""
    jobs, kept = plan_entry(entry, overwrite)
    return {"written": _run(entry, jobs, progress), "kept": kept}


def plan_entry(entry: CatalogEntry, overwrite: bool = False) -> tuple[list[Job], int]:
    """The images still to write for `entry` and how many finished ones are kept; sources are checked here."""
    store = entry.store_path
    if not entry.is_collection:
        if omezarr.is_complete_image(store) and not overwrite:
            return [], 1
        _check_sources(entry)
        return [Job(entry.source_paths, store, entry.label_source_paths)], 0
    if not entry.source:
        return [], len(entry.images())
    _check_sources(entry)
    jobs = [Job([f], store / f"{volume_stem(f)}.zarr") for f in collection_sources(entry.source_paths[0])]
    todo = [j for j in jobs if overwrite or not omezarr.is_complete_image(j.out)]
    return todo, len(jobs) - len(todo)


def _run(entry: CatalogEntry, jobs: list[Job], progress: bool) -> int:
    single = len(jobs) == 1 and not entry.is_collection
    from lsmfm.progress import progress_bar

    for job in progress_bar(jobs, desc=f"ingest {entry.id}", unit="image", enabled=progress and not single):
        ingest(job.sources, job.out, labels=job.labels, overwrite=True, progress=progress and single)
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
