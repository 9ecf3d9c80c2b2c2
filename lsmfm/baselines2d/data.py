"""Labelled 2D images (or 3D volumes used slice by slice) for the 2D baselines.

A `Case` is one scoring unit and one shot: a 2D image (Z = 1) or a 3D volume whose slice predictions are
stacked back to 3D. Training draws single 2D slices from the shots' cases (`lsmfm.baselines2d.task`).
Images are normalised by
percentiles per image or volume, as in pretraining; labels keep their instance ids (0 = background),
so Dice binarises them and the instance accuracy can match objects.

Folder layouts, tried in this order:
  1. `data.image_glob` + `data.label_glob` set: the matching files, paired in sorted order;
  2. `image/` and `label/` subfolders: files paired by name (e.g. ../shared/data/em_membrane_2d);
  3. `<stem>.<ext>` with `<stem>_label.<ext>` (`_blurred` files are ignored).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np

from lsmfm.baselines2d.config import Data2DConfig
from lsmfm.data.normalize import NormalizeConfig, percentile_normalize
from lsmfm.errors import ConfigError, InputError
from lsmfm.io.volumes import natural_key

SUFFIXES = (".png", ".tif", ".tiff", ".nii.gz", ".nii", ".zarr")


@dataclass
class Case:
    """One image or volume: `image` (Z, H, W) float32 in [0, 1], `label` (Z, H, W) int32 instance ids."""

    name: str
    image: np.ndarray
    label: np.ndarray
    is_3d: bool

    @cached_property
    def foreground_slices(self) -> np.ndarray:
        """Indices of the Z slices that hold foreground."""
        return np.flatnonzero(self.label.reshape(self.label.shape[0], -1).any(axis=1))


@dataclass
class Splits:
    train: list[Case]
    val: list[Case]
    test: list[Case]


def split_name(path: Path) -> tuple[str, str]:
    """('stem', '.ext') with double suffixes like .nii.gz kept together; ext is '' when unsupported."""
    name = path.name
    for suffix in SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)], suffix
    return name, ""


def read_array(path: Path) -> np.ndarray:
    """A 2D (H, W) image or 3D (Z, H, W) volume; RGB(A) 2D images become the mean of their colour channels."""
    _, ext = split_name(path)
    if ext == ".png":
        from PIL import Image

        with Image.open(path) as im:
            arr = np.asarray(im)
    elif ext in (".tif", ".tiff"):
        import tifffile

        with tifffile.TiffFile(path) as tif:
            axes = tif.series[0].axes
            arr = tif.asarray() if not set(axes) & set("ZQI") else None
        if arr is None:
            from lsmfm.io.volumes import read_volume

            arr = read_volume(path)[0]
    else:
        from lsmfm.io.volumes import read_volume

        arr = read_volume(path)[0]
    if arr.ndim == 3 and arr.shape[-1] in (3, 4) and ext in (".png", ".tif", ".tiff"):
        arr = arr[..., :3].mean(axis=-1)
    if arr.ndim not in (2, 3):
        raise InputError(path, f"expected a single-channel 2D image or 3D volume, got shape {arr.shape}")
    return arr


def find_pairs(folder: str | Path, cfg: Data2DConfig) -> list[tuple[Path, Path]]:
    """(image, label) file pairs in `folder`, by the first layout that applies (see the module docstring)."""
    root = Path(folder)
    if not root.is_dir():
        raise InputError(root, "data folder not found")
    if cfg.image_glob:
        images, labels = natural_sorted(root.glob(cfg.image_glob)), natural_sorted(root.glob(cfg.label_glob))
        if len(images) != len(labels):
            raise InputError(
                root,
                f"{len(images)} files match data.image_glob={cfg.image_glob!r} but "
                f"{len(labels)} match data.label_glob={cfg.label_glob!r}",
            )
        pairs = list(zip(images, labels))
    elif (root / "image").is_dir() and (root / "label").is_dir():
        pairs = []
        for image in _data_files(root / "image"):
            label = root / "label" / image.name
            if not label.exists():
                raise InputError(label, f"label missing for image {image}")
            pairs.append((image, label))
    else:
        pairs = []
        for image in _data_files(root):
            stem, ext = split_name(image)
            if stem.endswith(("_label", "_blurred")):
                continue
            label = root / f"{stem}_label{ext}"
            if not label.exists():
                raise InputError(label, f"label missing for image {image}")
            pairs.append((image, label))
    if not pairs:
        raise InputError(
            root,
            "no image/label pairs found: expected image/ + label/ subfolders, "
            "<stem> + <stem>_label files, or data.image_glob/data.label_glob",
        )
    return pairs


def _data_files(folder: Path) -> list[Path]:
    return natural_sorted(p for p in folder.iterdir() if split_name(p)[1] and not p.name.startswith("."))


def natural_sorted(paths: Iterable[Path]) -> list[Path]:
    """Sorted with digit runs compared as numbers: 2.png before 10.png."""
    return sorted(paths, key=natural_key)


def load_case(image_path: Path, label_path: Path, normalize: NormalizeConfig) -> Case:
    """Read, validate and normalise one pair."""
    image, label = read_array(image_path), read_array(label_path)
    if np.issubdtype(image.dtype, np.floating):
        bad = int(np.count_nonzero(~np.isfinite(image)))
        if bad:
            raise InputError(image_path, f"{bad} NaN/Inf pixel(s) in the image; replace them (e.g. by the "
                                         "background value) before training: they would make every loss NaN")
    if image.shape != label.shape:
        raise InputError(
            label_path, f"label shape {label.shape} differs from image shape {image.shape} of {image_path}"
        )
    integral = np.issubdtype(label.dtype, np.integer) or label.dtype == bool
    if not integral and not np.array_equal(label, np.round(label)):
        raise InputError(label_path, "labels must be integer ids (0 = background), got fractional values")
    if label.min() < 0:
        raise InputError(label_path, "labels must be >= 0 (0 = background)")
    is_3d = image.ndim == 3
    image = np.asarray(percentile_normalize(image.astype(np.float32), normalize))
    label = label.astype(np.int32)
    if not is_3d:
        image, label = image[None], label[None]
    return Case(split_name(image_path)[0], image, label, is_3d)


def load_cases(folder: str | Path, cfg: Data2DConfig) -> list[Case]:
    """All cases of a folder, 2D images cut into tiles when `cfg.tile` is set."""
    cases = [load_case(i, lab, cfg.normalize) for i, lab in find_pairs(folder, cfg)]
    if cfg.tile:
        cases = [t for c in cases for t in tile_case(c, cfg.tile)]
    return cases


def tile_case(case: Case, tile: int) -> list[Case]:
    """Non-overlapping tile x tile cases covering a 2D case (the last row/column aligned to the border)."""
    if case.is_3d:
        return [case]
    h, w = case.image.shape[-2:]
    out = []
    for y in tile_starts(h, tile):
        for x in tile_starts(w, tile):
            window = (slice(None), slice(y, y + tile), slice(x, x + tile))
            out.append(Case(f"{case.name}_y{y}_x{x}", case.image[window], case.label[window], False))
    return out


def tile_starts(size: int, tile: int) -> list[int]:
    """Start offsets of tiles covering `size`; the last one is aligned to the end (tiles never run over)."""
    if size <= tile:
        return [0]
    starts = list(range(0, size - tile + 1, tile))
    return starts if starts[-1] + tile == size else starts + [size - tile]


def load_splits(cfg: Data2DConfig) -> Splits:
    """Train, validation and test cases; without `test_dir`, the last `test_fraction` of the train cases
    is the test set."""
    if not cfg.train_dir:
        raise ConfigError("data.train_dir is required")
    train = load_cases(cfg.train_dir, cfg)
    val = load_cases(cfg.val_dir, cfg) if cfg.val_dir else []
    if cfg.test_dir:
        test = load_cases(cfg.test_dir, cfg)
    else:
        n_test = max(1, math.ceil(cfg.test_fraction * len(train)))
        if n_test >= len(train):
            raise InputError(
                cfg.train_dir,
                f"{len(train)} case(s) cannot be split into train and test: "
                "give data.test_dir, or data.tile to cut images into tiles",
            )
        train, test = train[:-n_test], train[-n_test:]
    return Splits(train, val, test)
