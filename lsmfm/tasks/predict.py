"""Whole-volume prediction, out of core and across ranks, resumable: blocks read lazily, MONAI's
Gaussian sliding window inside each block, block cores written into an OME-Zarr (NGFF 0.5) store.

Seams vanish exactly (`lsmfm.tasks.blocks`): each block reads the whole-volume windows touching its
core, so every voxel blends the same window outputs as one in-memory `sliding_window_inference` over the
whole volume (tested to 1e-5). Block cores are whole output shards, so blocks never share a file.

Ranks: under `torchrun` (or `srun`) every rank runs this same program on the same block plan and
takes every world-size-th unfinished block; rank 0 holds the output's lock (`lsmfm.io.lock`), prepares
`<out>.partial` and, once the ranks have pooled the pyramid, writes the metadata and commits the store.
A block's result does not depend on which rank computes it, so any number of ranks writes the same
store, bit for bit (given the same threads per process).

Resume: each finished block is recorded in the store's ledger (`lsmfm.tasks.ledger`). A killed or
preempted run leaves `<out>.partial`; the same command then runs only the unfinished blocks.
SIGTERM/SIGUSR1 finish the current block, record it and stop (the summary says `stopped`). An error
keeps the partial store for a resume when blocks were finished, and says so; otherwise nothing is left.

Normalisation is the model's recorded `NormalizeConfig`, with bounds from the input store's ingest
statistics when present, else from one strided subsample (<= ~2M voxels) of the whole volume; never per
block. NaN/Inf input voxels are predicted as their channel's lower bound and written as 0, with a
warning that counts them.

Outputs (`lsmfm.tasks.volume_store`), by the task's `volume_output`:
    mask (segment):  `0..n` float32 probabilities (c=1, z, y, x), mean-pooled; `labels/mask/0..n` uint8
                     mask (probability > threshold), max-pooled
    image (deblur):  `0..n` float32 restored image in the input's intensity units (c, z, y, x)
"""
from __future__ import annotations

import math
import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lsmfm.data.normalize import NormalizeConfig, denormalize_channels, normalize_channels
from lsmfm.device import resolve_device
from lsmfm.errors import ConfigError, InputError, LsmfmError, LsmfmWarning
from lsmfm.io import lock
from lsmfm.io.atomic import commit_partial
from lsmfm.io.omezarr import SHARD_CHUNKS
from lsmfm.io.volumes import Volume, materialize, open_volume
from lsmfm.signals import StopRequest
from lsmfm.tasks import volume_store
from lsmfm.tasks.base import sliding_window
from lsmfm.tasks.blocks import Block, count_windows, output_grid, plan_blocks, windows_along
from lsmfm.tasks.ledger import Ledger, fingerprint
from lsmfm.training import distributed

SUBSAMPLE_VOXELS = 2_000_000
OUTPUT_CHUNK = 64


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
    """Per-channel percentile bounds of the finite values of one strided subsample of the whole volume
    (every voxel when the volume has at most `max_voxels`)."""
    step = max(1, math.ceil((math.prod(volume.spatial_shape) / max_voxels) ** (1 / 3)))
    bounds = []
    for channel in volume.czyx:
        sample = np.asarray(channel[::step, ::step, ::step].compute(), dtype=np.float32)
        finite = sample[np.isfinite(sample)]
        if not finite.size:
            raise InputError(volume.path, "every sampled voxel is NaN/Inf: nothing to normalise")
        lo, hi = np.percentile(finite, [cfg.lower, cfg.upper])
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
            cores of whole output shards that fit); memory grows with (block + 2 * patch)^3.
        overlap: sliding-window overlap in [0, 1).
        batch_size: windows per forward pass.
        threshold: segmentation mask threshold; None: the one recorded with the model.
        device: "auto" (CUDA when available; each rank its own GPU), "cpu", "cuda", ...
        shard: output chunks (64³) per shard edge, capped by the block (1: one file per chunk).
        follow_symlinks: read a model folder whose files are symlinks leading outside it.
    """

    block: int = 256
    overlap: float = 0.25
    batch_size: int = 1
    threshold: float | None = None
    device: str = "auto"
    shard: int = SHARD_CHUNKS
    follow_symlinks: bool = False

    def __post_init__(self) -> None:
        if self.block < 1 or self.batch_size < 1 or self.shard < 1:
            raise ConfigError(f"block, batch and shard must be >= 1, got block={self.block}, "
                              f"batch={self.batch_size}, shard={self.shard}")
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
    problem = config.backbone.size_problem(roi)
    if problem is not None:
        raise InputError(model_dir, f"its patch size {list(roi)} {problem}")
    if opts.block < max(roi):
        raise ConfigError(f"block {opts.block} is smaller than the model's patch size {list(roi)}; "
                          f"use --block {max(roi)} or more")
    channels = volume.czyx.shape[0]
    if channels != config.backbone.in_channels:
        raise InputError(volume.path, f"has {channels} channel(s) but the model expects "
                                      f"{config.backbone.in_channels}")


@dataclass
class Job:
    """Everything every rank needs to run its share, identical on all ranks."""

    model: Any
    config: Any
    volume: Volume
    bounds: list[tuple[float, float]]
    opts: PredictOptions
    info: dict[str, Any]
    blocks: list[Block]
    chunk: int
    shard: int
    factors: list[tuple[int, int, int]]

    @property
    def mask(self) -> bool:
        return self.model.spec.volume_output == "mask"

    @property
    def roi(self) -> tuple[int, int, int]:
        return tuple(int(v) for v in self.config.patch_size)  # type: ignore[return-value]


def predict_volume(model_dir: str | Path, input_path: str | Path, out_path: str | Path,
                   opts: PredictOptions = PredictOptions(), overwrite: bool = False,
                   progress: bool = True) -> dict[str, Any]:
    """Predict a whole volume with a finetuned model folder into an OME-Zarr store, on this process or
    as one rank of a torchrun/srun job; returns a summary (shape, blocks, seconds, voxels/s, windows,
    normalisation bounds and their source, blocks resumed, `stopped` after SIGTERM/SIGUSR1)."""
    env = distributed.ensure_env()
    if env.world_size > 1:
        distributed.init(torch.device("cpu"))  # gloo: the ranks only exchange small objects
    try:
        out = Path(out_path)
        if out.exists() and not overwrite:
            raise InputError(out, "already exists; choose another --out or pass --overwrite")
        job = _plan_job(model_dir, input_path, opts, env)
        with _Rank0Lock(out, env):
            return _run(job, model_dir, input_path, out, overwrite, env, progress)
    finally:
        distributed.shutdown()


def _plan_job(model_dir: str | Path, input_path: str | Path, opts: PredictOptions,
              env: distributed.DistEnv) -> Job:
    from lsmfm.data.ingest.convert import pyramid_factors
    from lsmfm.tasks.models import load_task_model

    local = env.local_rank if env.world_size > 1 else None
    model, config = load_task_model(model_dir, resolve_device(opts.device, local), opts.follow_symlinks)
    volume = open_volume(input_path)
    check_inputs(model_dir, model, config, volume, opts)
    bounds, source = normalization_bounds(volume, config.normalize)
    info: dict[str, Any] = {
        "model": str(model_dir), "input": str(input_path), "task": model.task,
        "output": model.spec.volume_output,
        "patch_size": list(config.patch_size), "block": opts.block, "overlap": opts.overlap,
        "bounds": [list(b) for b in bounds], "bounds_source": source, "model_voxel_size": config.voxel_size,
        "normalize": {"lower": config.normalize.lower, "upper": config.normalize.upper,
                      "clip": config.normalize.clip},
        "model_reads": model_reads(config)}
    if model.spec.volume_output == "mask":
        recorded = config.task.get("threshold", 0.5)
        info["threshold"] = float(opts.threshold if opts.threshold is not None else recorded)
    chunk, shard = output_grid(opts.block, OUTPUT_CHUNK, opts.shard)
    roi = tuple(int(v) for v in config.patch_size)
    blocks = plan_blocks(volume.spatial_shape, roi, opts.overlap, opts.block, shard)  # type: ignore[arg-type]
    factors = pyramid_factors(volume.spatial_shape, volume.voxel_size, chunk)
    return Job(model, config, volume, bounds, opts, info, blocks, chunk, shard // chunk, factors)


def model_reads(config: Any) -> dict[str, Any]:
    """How the model sees the volume, as its config records it (the axis order and voxel scale its
    network was trained at, which pretrained encoder and BatchNorm statistics it started from), so a
    prediction says how it was made."""
    started = {k: config.pretraining[k] for k in ("which", "batchnorm") if k in config.pretraining}
    return {"axes": config.backbone.axes, "input_scale": config.backbone.input_scale, **started}


class _Rank0Lock:
    """Rank 0 holds the output's lock for the run; every rank stops if it is refused."""

    def __init__(self, out: Path, env: distributed.DistEnv) -> None:
        self.out, self.env, self.fd = out, env, None

    def __enter__(self) -> None:
        refused = None
        if self.env.is_main:
            try:
                self.fd, _ = lock.acquire(self.out, "lsmfm predict" + (
                    f" ({self.env.world_size} ranks)" if self.env.world_size > 1 else ""))
            except LsmfmError as exc:
                refused = exc
        if distributed.any_rank(refused is not None, torch.device("cpu")):
            raise refused or InputError(self.out, "rank 0 could not lock the output")

    def __exit__(self, *exc: Any) -> None:
        if self.fd is not None:
            lock.release(self.out, self.fd)



def _run(job: Job, model_dir: str | Path, input_path: str | Path, out: Path, overwrite: bool,
         env: distributed.DistEnv, progress: bool) -> dict[str, Any]:
    partial = out.with_name(out.name + ".partial")
    run = fingerprint(model_dir, input_path, {
        "options": {k: v for k, v in vars(job.opts).items() if k != "device"}, "bounds": job.info["bounds"],
        "threshold": job.info.get("threshold"), "blocks": len(job.blocks), "grid": [job.chunk, job.shard],
        "factors": job.factors})
    resumed = _on_rank0(env, lambda: _prepare(partial, out, job, run, overwrite))
    ledger = Ledger(partial)
    done = ledger.blocks()
    todo = [i for i in range(len(job.blocks)) if i not in done]
    start = time.perf_counter()
    stop = StopRequest()
    try:
        with stop:
            ran = _predict_blocks(job, partial, ledger, todo[env.rank::env.world_size], env, stop, progress)
            stopped = distributed.any_rank(stop.requested, torch.device("cpu"))
            if not stopped:
                stopped = _pyramid(job, partial, ledger, env, stop)
    except BaseException:
        _keep_or_clean(partial, ledger, env)
        raise
    seconds = time.perf_counter() - start
    records = ledger.blocks()
    summary = _summary(job, out, records, resumed, ran, seconds, stopped)
    if not stopped:
        distributed.barrier()
        if env.is_main:
            _warn_nonfinite(job, records)
            volume_store.write_metadata(partial, out.name, job.volume.voxel_size, job.factors,
                                        {**job.info, "nonfinite_voxels": summary["nonfinite_voxels"]},
                                        job.mask, _channel_names(job))
            ledger.remove()
            commit_partial(partial, out)
        distributed.barrier()
    return summary


def _prepare(partial: Path, out: Path, job: Job, run: dict[str, Any], overwrite: bool) -> int:
    """Resume a matching `.partial` of lsmfm's (returns its finished blocks), else start a fresh one."""
    ledger = Ledger(partial)
    if partial.is_dir() and lock.is_lsmfm_partial(partial) and ledger.matches(run):
        return len(ledger.blocks())
    if partial.exists() and lock.is_lsmfm_partial(partial):
        warnings.warn(LsmfmWarning(f"{partial}: the unfinished output of a different run (another model, "
                                   "input or option); starting over"))
    if out.exists() and not overwrite:
        raise InputError(out, "already exists; choose another --out or pass --overwrite")
    lock.partial_dir(out)
    volume_store.create_store(partial, 1 if job.mask else job.volume.czyx.shape[0], job.volume.spatial_shape,
                              job.mask, job.chunk, job.shard)
    ledger.start(run)
    return 0


def _predict_blocks(job: Job, partial: Path, ledger: Ledger, mine: list[int], env: distributed.DistEnv,
                    stop: StopRequest, progress: bool) -> int:
    """This rank's blocks, each written then recorded; stops after the current block when asked."""
    from lsmfm.progress import progress_bar

    image, mask = volume_store.open_levels(partial, job.mask)
    ran = 0
    bar = progress_bar(mine, desc="predict" if env.world_size == 1 else f"predict (rank {env.rank})",
                       unit="block", enabled=progress and env.is_main)
    for index in bar:
        began = time.perf_counter()
        blk = job.blocks[index]
        core, bad = predict_core(job.model, job.volume.czyx, blk, job.config.normalize, job.bounds, job.roi,
                                 job.opts)
        where = (slice(None),) + blk.core
        if job.mask:
            if bad is not None:
                core[:, bad] = 0
            image[where] = core
            mask[where] = np.greater(core, job.info["threshold"]).view(np.uint8)
        else:
            restored = denormalize_channels(core, job.bounds)
            if bad is not None:
                restored[:, bad] = 0
            image[where] = restored
        n_bad = 0 if bad is None else int(bad.sum())
        del core  # before the next block is read: two blocks' buffers never coexist
        ledger.record_block(index, {"rank": env.rank, "nonfinite": n_bad,
                                    "seconds": round(time.perf_counter() - began, 3)})
        ran += 1
        if stop.requested:
            break
    return ran


def _pyramid(job: Job, partial: Path, ledger: Ledger, env: distributed.DistEnv, stop: StopRequest
             ) -> bool:
    """Levels 1..n, each split over the ranks; returns True when stopped between levels."""
    if env.is_main:
        volume_store.create_pyramid(partial, job.factors, job.mask, job.chunk, job.shard)
    distributed.barrier()
    finished = ledger.levels()
    for level, factor in enumerate(job.factors, start=1):
        if level in finished:
            continue
        volume_store.pool_level(partial, level, factor, job.mask, env.rank, env.world_size)
        distributed.barrier()
        if env.is_main:
            ledger.record_level(level)
        if distributed.any_rank(stop.requested, torch.device("cpu")):
            return True
    return False


def _on_rank0(env: distributed.DistEnv, fn: Any) -> Any:
    """`fn()` on rank 0, its result (or its error, as one line) on every rank."""
    result: Any = None
    if env.is_main:
        try:
            result = fn()
        except LsmfmError as exc:
            result = exc
    shared = result if env.world_size == 1 else distributed.gather_objects(
        str(result) if isinstance(result, LsmfmError) else result)[0]
    if isinstance(result, LsmfmError):
        raise result
    if isinstance(shared, str):
        raise InputError(None, shared)
    return shared


def _keep_or_clean(partial: Path, ledger: Ledger, env: distributed.DistEnv) -> None:
    """After an error: keep a partial store that holds finished blocks (the same command resumes it),
    remove one that holds none (in a one-rank run: other ranks may still be writing)."""
    done = len(ledger.blocks()) if partial.exists() else 0
    if env.world_size == 1 and not done and lock.is_lsmfm_partial(partial):
        shutil.rmtree(partial, ignore_errors=True)
    elif done and env.is_main:
        warnings.warn(LsmfmWarning(f"{partial}: its {done} finished block(s) are kept; run the same command "
                                   "again to resume, or delete it"))


def _summary(job: Job, out: Path, records: dict[int, dict[str, Any]], resumed: int, ran: int,
             seconds: float, stopped: bool) -> dict[str, Any]:
    shape = job.volume.spatial_shape
    voxels = math.prod(shape)
    one_pass = math.prod(windows_along(s, r, job.opts.overlap) for s, r in zip(shape, job.roi))
    mine_voxels = ran * voxels / max(1, len(job.blocks))
    return {**job.info, "out": str(out), "shape": list(shape), "voxel_size": list(job.volume.voxel_size),
            "voxels": voxels, "seconds": seconds, "voxels_per_s": mine_voxels / seconds if seconds > 0 else 0.0,
            "blocks": len(job.blocks), "blocks_resumed": resumed, "blocks_run": ran,
            "blocks_done": len(records), "stopped": stopped, "ranks": distributed.ensure_env().world_size,
            "windows": count_windows(job.blocks, job.roi, job.opts.overlap), "windows_one_pass": one_pass,
            "chunk": job.chunk, "shard": job.shard * job.chunk, "levels": len(job.factors) + 1,
            "nonfinite_voxels": sum(int(r.get("nonfinite", 0)) for r in records.values())}


def _warn_nonfinite(job: Job, records: dict[int, dict[str, Any]]) -> None:
    count = sum(int(r.get("nonfinite", 0)) for r in records.values())
    if count:
        warnings.warn(LsmfmWarning(f"{job.volume.path}: {count} NaN/Inf input voxel(s) were predicted as their "
                                   "channel's lower normalisation bound and written as 0"))


def _channel_names(job: Job) -> list[str]:
    if job.mask:
        return ["probability"]
    return [f"restored channel {c}" for c in range(job.volume.czyx.shape[0])]


def predict_core(model: torch.nn.Module, data: Any, blk: Block, norm: NormalizeConfig,
                 bounds: list[tuple[float, float]], roi: tuple[int, int, int], opts: PredictOptions
                 ) -> tuple[np.ndarray, np.ndarray | None]:
    """Read one block's region from the lazy (C, Z, Y, X) `data`, normalise it and predict it: (the
    result over the block's core, the core's NaN/Inf input voxels or None). NaN/Inf voxels enter the
    network as their channel's lower bound. Each buffer is released as soon as the next one exists."""
    raw = materialize(data[(slice(None),) + blk.region], scheduler="synchronous")
    bad = None
    if np.issubdtype(raw.dtype, np.floating):
        nonfinite = ~np.isfinite(raw)
        if nonfinite.any():
            for c, (low, _) in enumerate(bounds):
                raw[c][nonfinite[c]] = low
            bad = nonfinite.any(axis=0)[blk.core_in_region]
    block = normalize_channels(raw, norm, bounds)
    del raw
    return predict_block(model, block, roi, opts)[(slice(None),) + blk.core_in_region], bad


def predict_block(model: torch.nn.Module, block: np.ndarray, roi: tuple[int, int, int], opts: PredictOptions
                  ) -> np.ndarray:
    """Gaussian-blended sliding window over one normalised (C, Z, Y, X) block: segmentation
    probabilities (1, Z, Y, X) or the restored image in normalised units (C, Z, Y, X)."""
    y = sliding_window(model, block, roi, opts.overlap, opts.batch_size)
    return (y.sigmoid_() if model.spec.volume_output == "mask" else y).numpy()
