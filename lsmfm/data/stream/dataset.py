"""Stream random 3D patches from the OME-Zarr stores of data catalogs, for pretraining.

Every store is checked at construction from its JSON metadata alone (no zarr call before DataLoader
workers fork: zarr v3 can deadlock in a child forked after the parent used it); arrays are opened lazily
in each worker. The per-patch hot path is one region read (chunk files decoded straight into the patch,
`lsmfm.io.chunk_reader`), one uint16 -> float32 conversion and normalisation by the store's intensity
statistics; Dask is used only to plan (the foreground map of a coarse level, once per image per worker).

Sample i of rank r is a pure function of (seed, r, i), see `lsmfm.data.stream.sampling`.
"""
from __future__ import annotations

import importlib
import os
import re
import time
from dataclasses import dataclass
from typing import Any, Collection, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, default_collate, get_worker_info

from lsmfm.data.normalize import percentile_normalize
from lsmfm.data.stream.augment import Augmenter
from lsmfm.data.stream.config import ForegroundConfig, StreamConfig, StreamTextConfig
from lsmfm.data.stream.sampling import (ForegroundMap, ImagePlan, choose_position, choose_weighted,
                                        plan_image, sample_rng, worker_indices)
from lsmfm.errors import InputError
from lsmfm.io.chunk_reader import open_reader


@dataclass
class Draw:
    """Where one sample comes from: a pure function of (seed, rank, index)."""

    index: int
    source: str
    text: str
    image: ImagePlan
    start: tuple[int, ...]  # (z, y, x) of the region in the read level
    augment_seed: int


@dataclass
class _Source:
    id: str
    weight: float
    descriptions: list[str]
    images: list[ImagePlan]


class PatchStream(IterableDataset):
    """Infinite stream of {"image": (1, D, H, W) float32, "source", "text", "index"} dicts.

    Args:
        cfg: what to stream.
        rank, world_size: this process's place in distributed training; ranks draw independent streams.
        seed: the whole stream is a function of (seed, rank).
        start_index: first global sample index (samples consumed so far, to resume).
        block: indices are dealt to DataLoader workers in blocks of this size (`make_loader` uses the
            batch size so batches arrive in index order).
        entries: stream only these catalog entry ids (a train or validation split); None: all.

    Example:
        >>> stream = PatchStream(load_config(StreamConfig, "stream.yaml"), seed=0)
        >>> first = next(iter(stream))  # same as stream.sample(0)
    """

    def __init__(self, cfg: StreamConfig, rank: int = 0, world_size: int = 1, seed: int = 0,
                 start_index: int = 0, block: int = 1, entries: Collection[str] | None = None) -> None:
        super().__init__()
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        if start_index < 0 or block < 1:
            raise ValueError(f"start_index must be >= 0 and block >= 1, got {start_index}, {block}")
        self.cfg, self.rank, self.world_size, self.seed = cfg, rank, world_size, seed
        self.start_index, self.block = start_index, block
        self.sources = plan_sources(cfg, entries)
        self.weights = [s.weight for s in self.sources]
        self.augment = Augmenter(cfg.augment)
        self._state: _WorkerState | None = None

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        for index in worker_indices(self.start_index, worker, workers, self.block):
            yield self.sample(index)

    def locate(self, index: int) -> Draw:
        """Every random choice of sample `index`: source, image, region start, text and augmentation seed."""
        rng = sample_rng(self.seed, self.rank, index)
        source = self.sources[choose_weighted(rng, self.weights)]
        image = source.images[int(rng.integers(len(source.images)))]
        fg = self.cfg.foreground
        fg_map = self._worker_state().foreground(image, fg) if fg.enabled else None
        start = choose_position(rng, image.shape, image.region, fg_map, fg)
        text = _pick_text(rng, source.descriptions, self.cfg.text)
        return Draw(index, source.id, text, image, start, int(rng.integers(2**31 - 1)))

    def sample(self, index: int) -> dict[str, Any]:
        """Sample `index` of this rank; the same (seed, rank, index) always gives the same patch."""
        cfg = self.cfg
        draw = self.locate(index)
        region = self._worker_state().read(draw.image, draw.start)
        bounds = draw.image.bounds if cfg.normalize.source == "store" else None
        x = torch.from_numpy(percentile_normalize(region, cfg.normalize, bounds, inplace=True))[None]
        if tuple(x.shape[1:]) != tuple(cfg.patch_size):
            x = _resize(x, cfg.patch_size, cfg.resize)
        x = self.augment(x, draw.augment_seed)
        return {"image": x, "source": draw.source, "text": draw.text, "index": index}

    def _worker_state(self) -> "_WorkerState":
        """Open arrays per process: a state inherited through fork is discarded, never reused."""
        if self._state is None or self._state.pid != os.getpid():
            self._state = _WorkerState()
        return self._state

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_state": None}


class _WorkerState:
    """Readers, zarr arrays and foreground maps opened by this process, cached for its lifetime."""

    def __init__(self) -> None:
        self.pid = os.getpid()
        self.readers: dict[str, Any] = {}
        self.arrays: dict[str, Any] = {}
        self.maps: dict[str, ForegroundMap] = {}

    def read(self, image: ImagePlan, start: tuple[int, ...]) -> np.ndarray:
        """The hot path: one region of the read level as float32, decoded chunk by chunk (chunk_reader)."""
        if image.array_path not in self.readers:
            self.readers[image.array_path] = open_reader(image.array_path)
        index = image.index(tuple(slice(s, s + r) for s, r in zip(start, image.region)))
        return self.readers[image.array_path].read(index, np.float32)

    def array(self, path: str) -> Any:
        if path not in self.arrays:
            import zarr

            self.arrays[path] = zarr.open_array(path, mode="r")
        return self.arrays[path]

    def foreground(self, image: ImagePlan, cfg: ForegroundConfig) -> ForegroundMap:
        if image.array_path not in self.maps:
            import dask.array as da

            coarse = da.from_zarr(self.array(image.coarse_path))[image.index((slice(None),) * 3)]
            lo, hi = image.bounds or _subsample_bounds(coarse, image)
            self.maps[image.array_path] = ForegroundMap.from_mask(coarse > lo + cfg.threshold * (hi - lo))
        return self.maps[image.array_path]


def _subsample_bounds(coarse: Any, image: ImagePlan) -> tuple[float, float]:
    """Normalisation percentiles of a coarse level (stores without ingest statistics), on <= ~2M voxels."""
    step = max(1, int(np.ceil((np.prod(coarse.shape) / 2e6) ** (1 / 3))))
    sample = np.asarray(coarse[::step, ::step, ::step].compute(scheduler="synchronous"), dtype=np.float32)
    lo, hi = np.percentile(sample, [image.percentiles[0], image.percentiles[1]])
    return float(lo), float(hi)


def _pick_text(rng: np.random.Generator, descriptions: list[str], cfg: StreamTextConfig) -> str:
    if not descriptions:
        return ""
    if cfg.choice == "first":
        return descriptions[0]
    return descriptions[int(rng.integers(len(descriptions)))]


def _resize(x: torch.Tensor, size: list[int], mode: str = "area") -> torch.Tensor:
    """Resample (C, D, H, W) to `size`. "area": area averaging when shrinking on every axis (no aliasing),
    else trilinear; "trilinear": always trilinear, align_corners False (the paper's MONAI Resize)."""
    shrink = mode == "area" and all(s >= t for s, t in zip(x.shape[1:], size))
    mode = "area" if shrink else "trilinear"
    kwargs = {} if shrink else {"align_corners": False}
    return torch.nn.functional.interpolate(x[None], size=tuple(size), mode=mode, **kwargs)[0]


def plan_sources(cfg: StreamConfig, entries: Collection[str] | None = None) -> list[_Source]:
    """Every catalog entry (of `entries`, when given) and image checked up front, so bad input fails
    before any patch is read."""
    from lsmfm.data.catalog.entries import load_catalog

    if not cfg.catalogs:
        raise InputError(None, "the stream config lists no catalogs (set catalogs: [path/to/catalog.yaml])")
    sources = []
    for path in cfg.catalogs:
        for entry in load_catalog(path):  # an empty or malformed catalog is a ConfigError naming the file
            if entries is not None and entry.id not in entries:
                continue
            images = [plan_image(p, entry.channel, cfg) for p in entry.images()]
            sources.append(_Source(entry.id, float(entry.weight), list(entry.descriptions), images))
    if not sources:
        raise InputError(None, f"no catalog entry of {cfg.catalogs} is among {sorted(entries or [])}")
    return sources


def collate_patches(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Images stacked to (B, 1, D, H, W), sources and texts kept as lists of strings, indices a tensor.
    torch's default_collate does exactly this, and in a worker it stacks straight into shared memory
    (one copy less per batch than stacking then sending)."""
    return default_collate(samples)


def make_loader(cfg: StreamConfig, batch_size: int, num_workers: int = 0, rank: int = 0, world_size: int = 1,
                seed: int = 0, start_index: int = 0, entries: Collection[str] | None = None) -> DataLoader:
    """A DataLoader over `PatchStream` whose batches hold global indices start_index, start_index + 1, ...
    in order, for any number of workers; resume with start_index = samples consumed by this rank.
    `entries` restricts it to those catalog entries (the training split)."""
    stream = PatchStream(cfg, rank=rank, world_size=world_size, seed=seed, start_index=start_index,
                         block=batch_size, entries=entries)
    return PatchLoader(stream, batch_size=batch_size, num_workers=num_workers, collate_fn=collate_patches,
                       persistent_workers=num_workers > 0)


class PatchLoader(DataLoader):
    """A DataLoader whose workers' input errors (a lost or corrupt chunk, named by its file) arrive as
    the same one-line `InputError`, not as torch's RuntimeError wrapping the worker's traceback."""

    def __iter__(self) -> Iterator[Any]:
        return _OneLineErrors(super().__iter__())  # created now: the loader draws its seed here, as torch's


class _OneLineErrors:
    """Iterates the DataLoader's own iterator, turning workers' input errors back into `InputError`."""

    def __init__(self, batches: Iterator[Any]) -> None:
        self.batches = batches

    def __iter__(self) -> "_OneLineErrors":
        return self

    def __next__(self) -> Any:
        try:
            return next(self.batches)
        except RuntimeError as exc:
            raise worker_input_error(exc) or exc


def worker_input_error(exc: BaseException) -> InputError | None:
    """The lsmfm input error a DataLoader worker raised, recovered from torch's re-raised text."""
    lines = str(exc).strip().splitlines()
    found = re.match(r"(lsmfm(?:\.\w+)+)\.(\w+): (.*)$", lines[-1]) if lines else None
    if found is None or "DataLoader worker" not in lines[0]:
        return None
    kind = getattr(importlib.import_module(found.group(1)), found.group(2), None)
    if not (isinstance(kind, type) and issubclass(kind, InputError)):
        return None
    error = InputError(None, found.group(3))
    error.__cause__ = exc
    return error


def stream_report(cfg: StreamConfig, n_batches: int, batch_size: int, num_workers: int, seed: int = 0,
                  progress: bool = True) -> dict[str, Any]:
    """Stream `n_batches` and summarise them per source (count, mean intensity, share of voxels above the
    foreground threshold). `patches_per_s` is the steady rate after the first batch; `startup_s` (config
    checks, imports, worker start-up, first batch) is reported apart."""
    from lsmfm.progress import progress_bar

    start = time.perf_counter()
    batches = iter(make_loader(cfg, batch_size, num_workers=num_workers, seed=seed))
    per_source: dict[str, dict[str, float]] = {}
    first = start
    for step in progress_bar(range(n_batches), desc="streaming", unit="batch", enabled=progress):
        batch = next(batches)
        if step == 0:
            first = time.perf_counter()
        for image, source in zip(batch["image"], batch["source"]):
            row = per_source.setdefault(source, {"count": 0, "intensity_sum": 0.0, "foreground_sum": 0.0})
            row["count"] += 1
            row["intensity_sum"] += float(image.mean())
            row["foreground_sum"] += float((image > cfg.foreground.threshold).float().mean())
    end = time.perf_counter()
    steady = (n_batches - 1) * batch_size / (end - first) if n_batches > 1 else batch_size / (end - start)
    return {
        "sources": {k: {"count": int(v["count"]), "mean_intensity": v["intensity_sum"] / v["count"],
                        "foreground_fraction": v["foreground_sum"] / v["count"]}
                    for k, v in sorted(per_source.items())},
        "patches": n_batches * batch_size, "batch_size": batch_size, "num_workers": num_workers,
        "patch_size": list(cfg.patch_size), "startup_s": first - start, "elapsed_s": end - start,
        "patches_per_s": steady,
    }


def format_stream_report(report: dict[str, Any]) -> str:
    """The report as a plain-text table, one row per source, then the throughput."""
    rows = [f"{'source':<32} {'patches':>8} {'mean intensity':>15} {'foreground':>11}"]
    for source, row in report["sources"].items():
        rows.append(f"{source:<32} {row['count']:>8d} {row['mean_intensity']:>15.3f} "
                    f"{row['foreground_fraction']:>11.3f}")
    patch = "x".join(str(p) for p in report["patch_size"])
    rows.append(f"{report['patches']} patches of {patch} in {report['elapsed_s']:.1f} s with "
                f"{report['num_workers']} workers: {report['patches_per_s']:.1f} patches/s after the first "
                f"batch (start-up {report['startup_s']:.1f} s)")
    return "\n".join(rows)
