"""Dataset catalogs: YAML lists of image sources with their metadata and free-text descriptions.

A catalog is what pretraining reads: which OME-Zarr stores to stream, with what weight, and the text
that goes with each source (the text side of image-text pretraining). Format:

    defaults:              # optional; keys shared by every entry (an entry's own keys win)
      licence: MIT
    entries:
      - id: brain_th       # unique
        store: ../runs/stores/brain_th.zarr    # an OME-Zarr image, or a folder of *.zarr images
        source: raw/brain_th.tif               # optional: what `lsmfm catalog ingest` converts
        descriptions: ["Light-sheet image of ..."]

A store whose name ends in `.zarr` is one image (its `source`: one file, a TIFF plane folder, or a list
of channel files); any other store is a collection folder of images, one per volume file in the
`source` folder. Relative paths resolve against the catalog file's folder.
"""
from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import yaml

from lsmfm.config import from_dict, read_yaml
from lsmfm.errors import ConfigError, InputError
from lsmfm.io import omezarr
from lsmfm.io.atomic import atomic_write_text
from lsmfm.io.volumes import natural_key

VOLUME_SUFFIXES = (".nii.gz", ".nii", ".tif", ".tiff", ".zarr")


@dataclass
class CatalogEntry:
    """One source of images. `voxel_size` [z, y, x] µm, when given, must match the store's."""

    id: str
    store: str
    descriptions: list[str]
    source: list[str] = field(default_factory=list)
    label_sources: dict[str, str] = field(default_factory=dict)
    channel: int = 0
    organism: str = ""
    stain: str = ""
    voxel_size: list[float] | None = None
    licence: str = ""
    citation: str = ""
    labels: str | None = None
    class_label: str | None = None
    weight: float = 1.0
    root: Path = field(default=Path("."), init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not re.fullmatch(r"[\w.+-]+", self.id):
            raise ValueError(f"id {self.id!r} must be non-empty letters, digits, '_', '.', '+', '-'")
        if not self.descriptions or not all(isinstance(d, str) and d.strip() for d in self.descriptions):
            raise ValueError(f"entry {self.id!r}: descriptions must hold at least one non-empty text")
        if self.channel < 0 or self.weight <= 0:
            raise ValueError(f"entry {self.id!r}: channel must be >= 0 and weight > 0")
        if self.voxel_size is not None and (len(self.voxel_size) != 3 or min(self.voxel_size) <= 0):
            raise ValueError(f"entry {self.id!r}: voxel_size must be 3 positive µm values [z, y, x]")

    def resolve(self, path: str) -> Path:
        """A catalog path as an absolute path (relative ones start at the catalog's folder)."""
        p = Path(os.path.expanduser(path))
        return p if p.is_absolute() else (self.root / p).resolve()

    @property
    def store_path(self) -> Path:
        return self.resolve(self.store)

    @property
    def source_paths(self) -> list[Path]:
        return [self.resolve(s) for s in self.source]

    @property
    def label_source_paths(self) -> dict[str, Path]:
        return {name: self.resolve(p) for name, p in self.label_sources.items()}

    @property
    def is_collection(self) -> bool:
        return not self.store.rstrip("/").endswith(".zarr")

    def label_path(self, image: Path) -> Path | None:
        """The label image that goes with `image`: `labels` is an NGFF label name inside the image
        (`<image>/labels/<name>`) or, when it ends in `.zarr`, a separate label store; None without labels."""
        if not self.labels:
            return None
        return self.resolve(self.labels) if self.labels.endswith(".zarr") else image / "labels" / self.labels

    def images(self) -> list[Path]:
        """The finished OME-Zarr images of this entry; InputError when the store is missing or empty."""
        path = self.store_path
        hint = "run `lsmfm catalog ingest CATALOG` to create it from `source`"
        if not path.exists():
            raise InputError(path, f"catalog entry {self.id!r}: store is missing; {hint}")
        if not self.is_collection:
            if not omezarr.is_complete_image(path):
                raise InputError(path, f"catalog entry {self.id!r}: not a finished OME-Zarr image; {hint}")
            return [path]
        found = sorted((p for p in path.glob("*.zarr") if omezarr.is_complete_image(p)), key=natural_key)
        if not found:
            raise InputError(path, f"catalog entry {self.id!r}: collection folder holds no finished *.zarr "
                                   f"image; {hint}")
        return found


def volume_stem(path: Path) -> str:
    """A volume file's name without its (possibly double) suffix."""
    name = path.name
    for suffix in VOLUME_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def collection_sources(folder: Path) -> list[Path]:
    """The volume files (NIfTI, TIFF, Zarr) directly inside `folder`, naturally sorted."""
    if not folder.is_dir():
        raise InputError(folder, "collection source must be a folder of volume files")
    return sorted((p for p in folder.iterdir() if p.name.lower().endswith(VOLUME_SUFFIXES)
                   and not p.name.startswith(".")), key=natural_key)


def load_catalog(path: str | Path) -> list[CatalogEntry]:
    """Read and check a catalog: unknown keys, missing fields and duplicate ids are errors naming the file."""
    path = Path(path)
    data = read_yaml(path)
    extra = sorted(set(data) - {"defaults", "entries"})
    if extra:
        raise ConfigError(f"{path}: unknown top-level key(s) {extra}; allowed: defaults, entries")
    defaults, items = data.get("defaults") or {}, data.get("entries")
    if not isinstance(defaults, dict) or not isinstance(items, list) or not items:
        raise ConfigError(f"{path}: needs a non-empty `entries:` list (and `defaults:`, if any, a mapping)")
    entries, seen = [], set()
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            raise ConfigError(f"{path}: entry #{i} must be a mapping, got {type(item).__name__}")
        entry = _entry(path, {**defaults, **item}, i)
        if entry.id in seen:
            raise ConfigError(f"{path}: duplicate entry id {entry.id!r}")
        seen.add(entry.id)
        entries.append(entry)
    return entries


def _entry(path: Path, item: dict[str, Any], index: int) -> CatalogEntry:
    eid = item.get("id", f"#{index}")
    allowed = {f.name for f in dataclasses.fields(CatalogEntry) if f.init}
    unknown = sorted(set(item) - allowed)
    if unknown:
        raise ConfigError(f"{path}: entry {eid!r}: unknown key(s) {unknown}; allowed: {sorted(allowed)}")
    missing = sorted({"id", "store", "descriptions"} - set(item))
    if missing:
        raise ConfigError(f"{path}: entry {eid!r}: missing required key(s) {missing}")
    entry = from_dict(CatalogEntry, item, source=f"{path}: entry {eid!r}")
    entry.root = path.parent.resolve()
    return entry


def write_catalog(path: str | Path, entries: Sequence[dict[str, Any]], defaults: dict[str, Any] | None = None,
                  header: str = "") -> Path:
    """Write a catalog atomically; it is loaded back first, so a written catalog always validates its keys."""
    path = Path(path)
    doc: dict[str, Any] = {"defaults": dict(defaults)} if defaults else {}
    doc["entries"] = [{k: v for k, v in e.items() if v not in (None, [], {})} for e in entries]
    comment = "".join(f"# {line}\n" if line else "#\n" for line in header.splitlines())
    text = comment + yaml.safe_dump(doc, sort_keys=False, allow_unicode=True, width=110)
    atomic_write_text(path, text)
    try:
        load_catalog(path)
    except ConfigError:
        path.unlink()
        raise
    return path


def relative_to(target: str | Path, folder: str | Path) -> str:
    """`target` as a path relative to `folder` (how catalogs store paths), with forward slashes."""
    return Path(os.path.relpath(Path(target).resolve(), Path(folder).resolve())).as_posix()


def validate_catalog(path: str | Path, deep: bool = False, progress: bool = False) -> list[dict[str, Any]]:
    """One row per entry: id, images, shape, voxel size (µm), #descriptions, status ('ok' or the problem).

    `deep` also reads every chunk of every image and label image (`lsmfm.io.check`): the row's
    `problems` lists each lost or corrupt chunk by path, and `chunks` counts those read."""
    rows = []
    for entry in load_catalog(path):
        row: dict[str, Any] = {"id": entry.id, "images": 0, "shape": "-", "voxel_size": "-",
                               "descriptions": len(entry.descriptions), "status": "ok"}
        try:
            _check_entry(entry, row)
            if deep:
                _check_chunks(entry, row, progress)
        except InputError as exc:
            row["status"] = str(exc)
        rows.append(row)
    return rows


def _check_chunks(entry: CatalogEntry, row: dict[str, Any], progress: bool) -> None:
    from lsmfm.io.check import check_store, summarize

    stores = list(dict.fromkeys(p for image in entry.images() for p in (image, entry.label_path(image))
                                if p is not None and not str(p).startswith(str(image) + os.sep)))
    totals = summarize([c for store in stores for c in check_store(store, progress)])
    row["chunks"], row["problems"] = totals["chunks"], totals["problems"]
    if totals["problems"]:
        raise InputError(entry.store_path, f"{len(totals['problems'])} lost or corrupt chunk(s) of "
                                           f"{totals['chunks']} (listed below)")


def _check_entry(entry: CatalogEntry, row: dict[str, Any]) -> None:
    images = entry.images()
    row["images"] = len(images)
    if entry.is_collection and entry.source and entry.source_paths[0].is_dir():
        expected = len(collection_sources(entry.source_paths[0]))
        if len(images) < expected:
            raise InputError(entry.store_path, f"incomplete collection: {len(images)} of {expected} images; "
                                               "run `lsmfm catalog ingest CATALOG` to finish it")
    checked = [_check_image(entry, image) for image in images]
    shapes, sizes = {c[0] for c in checked}, sorted({c[1] for c in checked})
    row["shape"] = "x".join(map(str, shapes.pop())) if len(shapes) == 1 else f"{len(shapes)} shapes"
    row["voxel_size"] = "x".join(f"{v:g}" for v in sizes[0]) + (" (varies)" if len(sizes) > 1 else "")
    for size in sizes if entry.voxel_size is not None else []:
        if not all(abs(a - b) <= 0.02 * b for a, b in zip(size, entry.voxel_size)):
            raise InputError(entry.store_path, f"store voxel size {size} µm differs from the catalog's "
                                               f"{tuple(entry.voxel_size)} µm")


def _check_image(entry: CatalogEntry, image: Path) -> tuple[tuple[int, ...], tuple[float, ...]]:
    """(spatial shape, voxel size) of one image, after checking its channel and label image."""
    group, ms = omezarr.open_image(image)
    shape = tuple(group[ms.paths[0]].shape)
    if entry.channel >= shape[0]:
        raise InputError(image, f"entry {entry.id!r} asks for channel {entry.channel}, the image has "
                                f"{shape[0]}")
    label = entry.label_path(image)
    if label is not None:
        if not omezarr.is_complete_image(label):
            raise InputError(label, f"entry {entry.id!r}: label image {entry.labels!r} is missing or "
                                    "unfinished")
        lab_group, lab_ms = omezarr.open_image(label)
        lab_shape = tuple(lab_group[lab_ms.paths[0]].shape[-3:])
        if lab_shape != shape[-3:]:
            raise InputError(label, f"label shape {lab_shape} differs from the image's {shape[-3:]}")
    return shape[1:], tuple(round(v, 3) for v in ms.voxel_sizes[0])
