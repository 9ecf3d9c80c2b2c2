"""Whole-volume prediction, out of core: blocks read lazily, MONAI's Gaussian sliding window inside each
block, block cores written into an OME-Zarr (NGFF 0.5) store.

Seams vanish exactly, not just approximately: block cores start on the sliding window's grid (multiples
of the window step `int(patch * (1 - overlap))`; an axis is split into the fewest cores of at most
`block` voxels, balanced), and each block is read with the context of every window
of the whole-volume grid that touches its core (a halo of `ceil(patch / step) - 1` steps before the core,
`patch - step` voxels after it). The windows MONAI places inside a block are then exactly the
whole-volume windows touching the core, so every voxel blends the same window outputs with the same
Gaussian weights as one in-memory `sliding_window_inference` over the whole volume (tested to 1e-5).

Normalisation is the model's recorded `NormalizeConfig`, with bounds from the input store's ingest
statistics when present, else from one strided subsample (<= ~2M voxels) of the whole volume; never per
block, which would give every block its own intensity scale.

Outputs (`<out>.partial` while running, renamed to `<out>` at the end), by the task's `volume_output`:
    mask (segment):  `0` float32 probabilities (c=1, z, y, x); `labels/mask` uint8 mask (probability >
                     threshold)
    image (deblur):  `0` float32 restored image in the input's intensity units (c, z, y, x)
"""
from __future__ import annotations

import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lsmfm.data.normalize import NormalizeConfig, denormalize_channels, normalize_channels
from lsmfm.errors import ConfigError, InputError
from lsmfm.device import resolve_device
from lsmfm.io.atomic import commit_partial
from lsmfm.io.lock import output_lock, partial_dir
from lsmfm.io.volumes import Volume, materialize, open_volume
from lsmfm.tasks.base import sliding_window

SUBSAMPLE_VOXELS = 2_000_000
OUTPUT_CHUNK = 64


@dataclass(frozen=True)
class Block:
    """One unit of work: the `core` written to the output and the `region` read (core + context)."""

    core: tuple[slice, slice, slice]
    region: tuple[slice, slice, slice]

    @property
    def core_in_region(self) -> tuple[slice, slice, slice]:
        return tuple(slice(c.start - r.start, c.stop - r.start)  # type: ignore[return-value]
                     for c, r in zip(self.core, self.region))


def window_step(roi: int, overlap: float) -> int:
    """The sliding window's step along an axis, as MONAI computes it."""
    return max(int(roi * (1.0 - overlap)), 1)


def output_chunk(blocks: list[Block]) -> int:
    """A chunk edge (16-64) that divides every core boundary, so each block writes whole chunks (no
    read-modify-write of chunks shared by two blocks, half the writer's memory); 64 when none exists."""
    inner = {s.start for b in blocks for s in b.core} - {0}
    if not inner:
        return OUTPUT_CHUNK
    g = math.gcd(*inner)
    return next((d for d in range(min(OUTPUT_CHUNK, g), 15, -1) if g % d == 0), OUTPUT_CHUNK)


def core_starts(size: int, step: int, limit: int) -> list[int]:
    """Core starts on the window grid along an axis: the fewest cores of at most `limit` voxels, each
    with an equal share of the window steps (a short tail core would rerun a halo of windows for a few
    voxels). `limit` is at least one step."""
    units = math.ceil(size / step)  # the last step may be partial
    for n in range(math.ceil(size / limit), units):
        starts = [step * (units * k // n) for k in range(n)]
        if all(b - a <= limit for a, b in zip(starts, [*starts[1:], size])):
            return starts
    return [step * k for k in range(units)]  # one step per core


def axis_plan(size: int, roi: int, overlap: float, block: int) -> list[tuple[int, int, int, int]]:
    """(core start, core stop, read start, read stop) of the blocks along one axis (see module doc)."""
    if size <= roi:
        return [(0, size, 0, size)]  # MONAI pads the whole axis: only one block reproduces that
    step = window_step(roi, overlap)
    before = (math.ceil(roi / step) - 1) * step
    starts = core_starts(size, step, max(block, step))
    if len(starts) > 1 and size - starts[-1] < roi - before:
        starts.pop()  # too short to hold a full window with its context: merge into the previous core
    plan = []
    for k, c0 in enumerate(starts):
        c1 = starts[k + 1] if k + 1 < len(starts) else size
        r1 = size if size - roi < c1 else c1 - step + roi
        plan.append((c0, c1, max(0, c0 - before), r1))
    return plan


def windows_along(size: int, roi: int, overlap: float) -> int:
    """Windows MONAI's sliding window places along an axis of `size` voxels (one when it pads)."""
    if size <= roi:
        return 1
    return math.ceil((size - roi) / window_step(roi, overlap)) + 1


def count_windows(blocks: list[Block], roi: tuple[int, int, int], overlap: float) -> int:
    """Network windows run over all blocks; halo windows are run once per block that reads them, so
    this exceeds one whole-volume pass by about (1 + step / core)³: the price of bounded memory."""
    return sum(math.prod(windows_along(r.stop - r.start, n, overlap) for r, n in zip(b.region, roi))
               for b in blocks)


def plan_blocks(shape: tuple[int, int, int], roi: tuple[int, int, int], overlap: float, block: int
                ) -> list[Block]:
    """All blocks of a (Z, Y, X) volume, z-major."""
    axes = [axis_plan(s, r, overlap, block) for s, r in zip(shape, roi)]
    return [Block(tuple(slice(a[0], a[1]) for a in combo),  # type: ignore[arg-type]
                  tuple(slice(a[2], a[3]) for a in combo))  # type: ignore[arg-type]
            for combo in ((z, y, x) for z in axes[0] for y in axes[1] for x in axes[2])]


def store_bounds(path: str | Path, cfg: NormalizeConfig, channels: int) -> list[tuple[float, float]] | None:
    """Per-channel bounds from an ingested store's statistics (`attrs["lsmfm"]["intensity"][c]
    ["percentiles"]`, interpolated between the stored percentiles); None when the input has none."""
    import zarr

    from lsmfm.io.omezarr import read_intensity, stored_percentile

    try:
        stats = read_intensity(zarr.open_group(str(path), mode="r"))
    except Exception:  # TIFF, NIfTI or a plain Zarr array: no recorded statistics
        return None
    if len(stats) < channels:
        return None
    try:
        return [(stored_percentile(s, cfg.lower), stored_percentile(s, cfg.upper)) for s in stats[:channels]]
    except (KeyError, TypeError, ValueError):  # statistics without the model's percentiles
        return None


def subsample_bounds(volume: Volume, cfg: NormalizeConfig, max_voxels: int = SUBSAMPLE_VOXELS
                     ) -> list[tuple[float, float]]:
    """Per-channel percentile bounds from one strided subsample of the whole volume (every voxel when
    the volume has at most `max_voxels`)."""
    step = max(1, math.ceil((math.prod(volume.spatial_shape) / max_voxels) ** (1 / 3)))
    bounds = []
    for channel in volume.czyx:
        sample = np.asarray(channel[::step, ::step, ::step].compute(), dtype=np.float32)
        lo, hi = np.percentile(sample, [cfg.lower, cfg.upper])
        bounds.append((float(lo), float(hi)))
    return bounds


def normalization_bounds(volume: Volume, cfg: NormalizeConfig) -> tuple[list[tuple[float, float]], str]:
    """(per-channel bounds, where they came from: "store" or "subsample")."""
    recorded = store_bounds(volume.path, cfg, volume.czyx.shape[0])
    if recorded is not None:
        return recorded, "store"
    return subsample_bounds(volume, cfg), "subsample"


@dataclass(frozen=True)
class PredictOptions:
    """How `predict_volume` runs.

    Args:
        block: largest core edge of a block in voxels (each axis is split into the fewest balanced
            cores on the window grid that fit); memory grows with (block + patch)^3.
        overlap: sliding-window overlap in [0, 1).
        batch_size: windows per forward pass.
        threshold: segmentation mask threshold; None: the one recorded with the model.
        device: "auto" (CUDA when available), "cpu", "cuda", ...
    """

    block: int = 256
    overlap: float = 0.25
    batch_size: int = 1
    threshold: float | None = None
    device: str = "auto"

    def __post_init__(self) -> None:
        if self.block < 1 or self.batch_size < 1:
            raise ConfigError(f"block and batch must be >= 1, got block={self.block}, "
                              f"batch={self.batch_size}")
        if not 0.0 <= self.overlap < 1.0:
            raise ConfigError(f"overlap must be in [0, 1), got {self.overlap}")
        if self.threshold is not None and not 0.0 < self.threshold < 1.0:
            raise ConfigError(f"threshold must be in (0, 1), got {self.threshold}")



def check_inputs(model_dir: str | Path, model: Any, config: Any, volume: Volume, opts: PredictOptions
                 ) -> None:
    """Every reason the run cannot succeed, raised before any output exists."""
    problem = model.spec.predict_problem(model.head_config)
    if problem is not None:
        raise InputError(model_dir, problem)
    roi = config.patch_size  # validated on load: three positive multiples of the backbone's size multiple
    if opts.block < max(roi):
        raise ConfigError(f"block {opts.block} is smaller than the model's patch size {list(roi)}; "
                          f"use --block {max(roi)} or more")
    channels = volume.czyx.shape[0]
    if channels != config.backbone.in_channels:
        raise InputError(volume.path, f"has {channels} channel(s) but the model expects "
                                      f"{config.backbone.in_channels}")


def predict_volume(model_dir: str | Path, input_path: str | Path, out_path: str | Path,
                   opts: PredictOptions = PredictOptions(), overwrite: bool = False,
                   progress: bool = True) -> dict[str, Any]:
    """Predict a whole volume with a finetuned model folder into an OME-Zarr store; returns a summary
    (shape, blocks, seconds, voxels/s, normalisation bounds and their source)."""
    from lsmfm.tasks.models import load_task_model

    out = Path(out_path)
    if out.exists() and not overwrite:
        raise InputError(out, "already exists; choose another --out or pass --overwrite")
    model, config = load_task_model(model_dir, resolve_device(opts.device))
    volume = open_volume(input_path)
    check_inputs(model_dir, model, config, volume, opts)
    bounds, source = normalization_bounds(volume, config.normalize)
    info: dict[str, Any] = {
        "model": str(model_dir), "input": str(input_path), "task": model.task,
        "output": model.spec.volume_output,
        "patch_size": list(config.patch_size), "block": opts.block, "overlap": opts.overlap,
        "bounds": [list(b) for b in bounds], "bounds_source": source, "model_voxel_size": config.voxel_size,
        "normalize": {"lower": config.normalize.lower, "upper": config.normalize.upper,
                      "clip": config.normalize.clip}}
    if model.spec.volume_output == "mask":
        recorded = config.task.get("threshold", 0.5)
        info["threshold"] = float(opts.threshold if opts.threshold is not None else recorded)
    with output_lock(out, "lsmfm predict"):
        if out.exists() and not overwrite:
            raise InputError(out, "already exists; choose another --out or pass --overwrite")
        partial = partial_dir(out)  # an old one was left by a killed run
        start = time.perf_counter()
        try:
            windows = write_prediction(partial, model, config, volume, bounds, opts, info.get("threshold"),
                                       progress)
            seconds = time.perf_counter() - start
            write_metadata(partial, out.name, volume.voxel_size, info,
                           segment=model.spec.volume_output == "mask")
            commit_partial(partial, out)
        except BaseException:
            shutil.rmtree(partial, ignore_errors=True)
            raise
    voxels = math.prod(volume.spatial_shape)
    return {**info, "out": str(out), "shape": list(volume.spatial_shape),
            "voxel_size": list(volume.voxel_size), "voxels": voxels, "seconds": seconds,
            "voxels_per_s": voxels / seconds if seconds > 0 else float("inf"), **windows}


def write_prediction(path: Path, model: Any, config: Any, volume: Volume, bounds: list[tuple[float, float]],
                     opts: PredictOptions, threshold: float | None, progress: bool) -> dict[str, int]:
    """Predict block by block into a new store at `path`; returns the number of blocks, of windows run,
    and of windows one in-memory pass over the whole volume would run."""
    from lsmfm.progress import progress_bar

    roi = tuple(int(v) for v in config.patch_size)
    data = volume.czyx
    segment = model.spec.volume_output == "mask"
    blocks = plan_blocks(volume.spatial_shape, roi, opts.overlap, opts.block)  # type: ignore[arg-type]
    image, mask = create_store(path, 1 if segment else data.shape[0], volume.spatial_shape, segment,
                               output_chunk(blocks))
    for blk in progress_bar(blocks, desc="predict", unit="block", enabled=progress):
        core = predict_core(model, data, blk, config.normalize, bounds, roi, opts)  # type: ignore[arg-type]
        where = (slice(None),) + blk.core
        if segment:
            image[where] = core
            mask[where] = np.greater(core, threshold).view(np.uint8)
        else:
            image[where] = denormalize_channels(core, bounds)
        del core  # before the next block is read: two blocks' buffers never coexist
    one_pass = math.prod(windows_along(s, r, opts.overlap) for s, r in zip(volume.spatial_shape, roi))
    return {"blocks": len(blocks), "windows": count_windows(blocks, roi, opts.overlap),
            "windows_one_pass": one_pass}


def predict_core(model: torch.nn.Module, data: Any, blk: Block, norm: NormalizeConfig,
                 bounds: list[tuple[float, float]], roi: tuple[int, int, int], opts: PredictOptions
                 ) -> np.ndarray:
    """Read one block's region from the lazy (C, Z, Y, X) `data`, normalise it and predict it; the
    result over the block's core. Each buffer is released as soon as the next one exists."""
    raw = materialize(data[(slice(None),) + blk.region], scheduler="synchronous")
    block = normalize_channels(raw, norm, bounds)
    del raw
    return predict_block(model, block, roi, opts)[(slice(None),) + blk.core_in_region]


def predict_block(model: torch.nn.Module, block: np.ndarray, roi: tuple[int, int, int], opts: PredictOptions
                  ) -> np.ndarray:
    """Gaussian-blended sliding window over one normalised (C, Z, Y, X) block: segmentation
    probabilities (1, Z, Y, X) or the restored image in normalised units (C, Z, Y, X)."""
    y = sliding_window(model, block, roi, opts.overlap, opts.batch_size)
    return (y.sigmoid_() if model.spec.volume_output == "mask" else y).numpy()


def create_store(path: Path, channels: int, shape: tuple[int, int, int], segment: bool,
                 chunk: int = OUTPUT_CHUNK) -> tuple[Any, Any]:
    """Empty zarr v3 arrays laid out as `lsmfm ingest` writes them: image level `0` (c, z, y, x) and, for
    segmentation, the label image `labels/mask/0` (c = 1)."""
    import zarr

    from lsmfm.io.omezarr import create_level

    root = zarr.open_group(str(path), mode="a", zarr_format=3)
    image = create_level(root, "0", (channels, *shape), "float32", chunk)
    mask = None
    if segment:
        labels = root.create_group("labels").create_group("mask")
        mask = create_level(labels, "0", (1, *shape), "uint8", chunk)
    return image, mask


def write_metadata(path: Path, name: str, voxel_size: tuple[float, float, float], info: dict[str, Any],
                   segment: bool) -> None:
    """NGFF 0.5 metadata (one level, the input's voxel size), written after the data, plus our run info."""
    import zarr

    from lsmfm.io.omezarr import multiscales_metadata, write_ome

    root = zarr.open_group(str(path), mode="r+")
    if segment:
        write_ome(root["labels/mask"], {
            "multiscales": [multiscales_metadata("mask", voxel_size, [], "none")],
            "image-label": {"colors": [{"label-value": 1, "rgba": [255, 64, 64, 255]}],
                            "source": {"image": "../../"}}})
        write_ome(root["labels"], {"labels": ["mask"]})
    write_ome(root, {"multiscales": [multiscales_metadata(name, voxel_size, [], "none")]},
              extra={"lsmfm": {"prediction": info}})
