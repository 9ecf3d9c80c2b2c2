"""Labelled patches for finetuning: folders in the `<stem>` + `<stem>_label` (+ `<stem>_blurred`) layout.

Everything is read and checked up front (shapes, binary labels, missing companions, classes), so a bad
file stops `lsmfm finetune` with its name before any training starts and before the run folder exists.
Few-shot sets are small: patches are held in memory as float32 (C, Z, Y, X) arrays.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lsmfm.errors import ConfigError, InputError
from lsmfm.io.volumes import read_volume
from lsmfm.models.backbones.registry import BackboneConfig
from lsmfm.tasks.config import DataConfig

SUFFIXES = (".ome.zarr", ".ome.tiff", ".ome.tif", ".nii.gz", ".nii", ".tiff", ".tif", ".zarr")
COMPANIONS = ("label", "blurred")


@dataclass
class Patch:
    """One labelled example: `image` (C, Z, Y, X) float32, optional binary `label` (Z, Y, X) uint8,
    optional `blurred` (C, Z, Y, X) float32, optional `class_name`."""

    stem: str
    path: Path
    image: np.ndarray
    voxel_size: tuple[float, float, float]
    label: np.ndarray | None = None
    blurred: np.ndarray | None = None
    class_name: str | None = None

    @property
    def spatial_shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.image.shape[-3:])  # type: ignore[return-value]


def split_name(path: Path) -> tuple[str, str] | None:
    """(stem, suffix) of a volume file name, or None when the suffix is not a volume format."""
    name = path.name
    for suffix in SUFFIXES:
        if name.lower().endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)], suffix
    return None


def scan_folder(folder: str | Path) -> dict[str, dict[str, Path]]:
    """Map each image stem to its files: {"image": path, "label": path, "blurred": path} (when present)."""
    root = Path(folder)
    if not root.is_dir():
        raise InputError(root, "data folder not found")
    groups: dict[str, dict[str, Path]] = {}
    for path in sorted(root.iterdir()):
        parts = split_name(path)
        if parts is None or path.name.startswith("."):
            continue
        stem, role = parts[0], "image"
        for companion in COMPANIONS:
            if stem.endswith(f"_{companion}"):
                stem, role = stem[: -len(companion) - 1], companion
        files = groups.setdefault(stem, {})
        if role in files:
            raise InputError(path, f"two {role} files for stem {stem!r}: {files[role].name} and {path.name}")
        files[role] = path
    for stem, files in groups.items():
        if "image" not in files:
            orphan = next(iter(files.values()))
            raise InputError(orphan, f"no image {stem}<ext> next to this file "
                                     f"(ext one of {', '.join(SUFFIXES)})")
    if not groups:
        raise InputError(root, "no images found (expected <stem>.nii.gz + <stem>_label.nii.gz files)")
    return groups


def load_split(data: DataConfig, split: str, *, label: bool = False, blurred: bool = False,
               binarize: bool = False, class_pattern: str | None = None, class_field: str | None = None
               ) -> list[Patch]:
    """The patches of one split ("train", "val", "test") from its folder or its catalog entries."""
    if data.catalog:
        ids = getattr(data, f"{split}_ids")
        if not ids:
            raise ConfigError(f"data.{split}_ids is empty: list the catalog entry ids of the {split} split")
        if blurred:
            raise ConfigError("catalog entries hold no blurred copies: use deblur.pairs=synthetic with "
                              "data.catalog")
        return load_catalog_split(data.catalog, ids, label=label, binarize=binarize, class_field=class_field)
    folder = getattr(data, f"{split}_dir")
    if not folder:
        raise ConfigError(f"data.{split}_dir is not set")
    return load_folder(folder, label=label, blurred=blurred, binarize=binarize, class_pattern=class_pattern)


def load_folder(folder: str | Path, *, label: bool = False, blurred: bool = False, binarize: bool = False,
                class_pattern: str | None = None) -> list[Patch]:
    """Read and check every image of `folder` with the companions the task needs."""
    return [load_patch(files, label=label, blurred=blurred, binarize=binarize, class_pattern=class_pattern,
                       stem=stem) for stem, files in scan_folder(folder).items()]


def load_patch(files: dict[str, Path], *, stem: str, label: bool, blurred: bool, binarize: bool,
               class_pattern: str | None) -> Patch:
    """One image and its companions, checked against each other."""
    image_path = files["image"]
    image, voxel = _read_image(image_path)
    patch = Patch(stem=stem, path=image_path, image=image, voxel_size=voxel)
    if label:
        patch.label = read_label(_companion(files, "label", image_path), patch.spatial_shape, binarize)
    if blurred:
        blurred_path = _companion(files, "blurred", image_path)
        patch.blurred, _ = _read_image(blurred_path)
        if patch.blurred.shape != image.shape:
            raise InputError(blurred_path, f"blurred shape {patch.blurred.shape[1:]} differs from the "
                                           f"image's {image.shape[1:]} ({image_path.name})")
    if class_pattern is not None:
        patch.class_name = class_from_name(image_path, class_pattern)
    return patch


def load_catalog_split(catalog: str | Path, ids: list[str], *, label: bool, binarize: bool,
                       class_field: str | None) -> list[Patch]:
    """Every OME-Zarr image of the catalog entries `ids` (the entry's channel), with its label image
    (`labels:` of the entry) and class (the entry field `class_field`)."""
    from lsmfm.data.catalog.entries import load_catalog

    entries = {e.id: e for e in load_catalog(catalog)}
    unknown = [i for i in ids if i not in entries]
    if unknown:
        raise InputError(catalog, f"unknown entry id(s) {unknown}; the catalog has {sorted(entries)}")
    patches = []
    for entry in (entries[i] for i in ids):
        for image_path in entry.images():
            image, voxel = _read_image(image_path)
            if entry.channel >= image.shape[0]:
                raise InputError(image_path, f"entry {entry.id!r} asks for channel {entry.channel}, the "
                                             f"image has {image.shape[0]}")
            stem = f"{entry.id}_{image_path.name[:-len('.zarr')]}" if entry.is_collection else entry.id
            patch = Patch(stem=stem, path=image_path, image=image[entry.channel:entry.channel + 1],
                          voxel_size=voxel)
            if label:
                label_path = entry.label_path(image_path)
                if label_path is None:
                    raise InputError(catalog, f"entry {entry.id!r} has no `labels:`; segmentation needs them")
                patch.label = read_label(label_path, patch.spatial_shape, binarize)
            if class_field is not None:
                patch.class_name = getattr(entry, class_field, None)
                if not patch.class_name:
                    raise InputError(catalog, f"entry {entry.id!r} has no {class_field!r} (the class field)")
            patches.append(patch)
    return patches


def _companion(files: dict[str, Path], role: str, image_path: Path) -> Path:
    if role not in files:
        stem, suffix = split_name(image_path) or (image_path.name, "")
        raise InputError(image_path.with_name(f"{stem}_{role}{suffix}"),
                         f"missing {role} file for image {image_path.name}")
    return files[role]


def _read_image(path: Path) -> tuple[np.ndarray, tuple[float, float, float]]:
    data, voxel = read_volume(path)
    data = np.asarray(data, dtype=np.float32)
    if not np.isfinite(data).all():
        raise InputError(path, "image contains NaN or Inf")
    return (data[None] if data.ndim == 3 else data), voxel


def read_label(path: Path, shape: tuple[int, int, int], binarize: bool) -> np.ndarray:
    """A (Z, Y, X) uint8 0/1 mask; values other than 0/1 are an error unless `binarize` (label > 0)."""
    data, _ = read_volume(path)
    if data.ndim != 3:
        raise InputError(path, f"label must be one 3D mask (Z, Y, X), got shape {data.shape}")
    if data.shape != shape:
        raise InputError(path, f"label shape {data.shape} differs from the image shape {shape}")
    if binarize:
        return (data > 0).astype(np.uint8)
    values = np.unique(data)
    if not np.isin(values, (0, 1)).all():
        shown = ", ".join(f"{v:g}" for v in values[:6]) + (", ..." if len(values) > 6 else "")
        raise InputError(path, f"labels must be binary (0/1), found values {shown}; set "
                               "segment.binarize=true to use label > 0 as foreground (e.g. instance labels)")
    return data.astype(np.uint8)


def class_from_name(path: Path, pattern: str) -> str:
    """The class of a patch: the first group of `pattern` matched against the file name."""
    try:
        match = re.search(pattern, path.name)
    except re.error as exc:
        raise InputError(None, f"classify.class_pattern {pattern!r} is not a regular expression: {exc}"
                         ) from exc
    if match is None or not match.groups() or not match.group(1):
        raise InputError(path, f"file name does not match classify.class_pattern {pattern!r} "
                               "(its first group is the class)")
    return match.group(1)


def check_fits(patches: list[Patch], patch_size: tuple[int, int, int], backbone: BackboneConfig,
               origin: str) -> None:
    """Training crops of `patch_size` must fit in every training image and suit the backbone
    (`BackboneConfig.size_problem`: its strides, SwinUNETR's instance-norm bottleneck)."""
    problem = backbone.size_problem(patch_size)
    if problem is not None:
        raise InputError(None, f"patch size {list(patch_size)} ({origin}) {problem}; set data.patch_size")
    for p in patches:
        if any(s > d for s, d in zip(patch_size, p.spatial_shape)):
            raise InputError(p.path, f"image {list(p.spatial_shape)} is smaller than the patch size "
                                     f"{list(patch_size)} ({origin}); set data.patch_size to fit the data")


def check_channels(splits: dict[str, list[Patch]], in_channels: int) -> None:
    """Every image must have the backbone's number of channels."""
    for patches in splits.values():
        for p in patches:
            if p.image.shape[0] != in_channels:
                raise InputError(p.path, f"image has {p.image.shape[0]} channel(s), the backbone expects "
                                         f"{in_channels}")


def random_crop(rng: np.random.Generator, shape: tuple[int, ...], size: tuple[int, int, int]
                ) -> tuple[slice, slice, slice]:
    """Slices of a uniformly placed crop of `size` inside a volume of spatial `shape`."""
    starts = [int(rng.integers(0, s - c + 1)) for s, c in zip(shape[-3:], size)]
    return tuple(slice(a, a + c) for a, c in zip(starts, size))  # type: ignore[return-value]


def check_training_images(patches: list[Patch]) -> None:
    """A constant training image (every voxel the same value) carries nothing to learn from: refused,
    every such file named (as ingest refuses a constant volume)."""
    constant = [p for p in patches if float(p.image.max()) == float(p.image.min())]
    if constant:
        names = ", ".join(str(p.path) for p in constant[:8]) + (", ..." if len(constant) > 8 else "")
        raise InputError(None, f"{len(constant)} training image(s) are constant (every voxel "
                               f"{float(constant[0].image.flat[0]):g} or the like): {names}; remove them "
                               "from the training set")
