"""The few-shot protocol of `lsmfm baseline2d`: for each (shots, seed), adapt a fresh copy of the model on
`shots` training cases (2D images or whole volumes, chosen by the seed with
`lsmfm.tasks.results.fewshot_subset`, as `lsmfm finetune` chooses volumes) through the one training loop
(`lsmfm.tasks.train`, with the slice task of `lsmfm.baselines2d.task`), score it on the test cases, and
record trainable parameters, annotated pixels, peak memory and time.

RUN_DIR is a protocol run folder (`lsmfm.tasks.protocol`): config.yaml, results.csv, metrics.json,
per_image.csv and the plots rewritten after every run, tb/shots<k>_seed<s>/ (TensorBoard),
predictions/shots<k>_seed<s>/ and adapted/ (the largest-shots, first-seed run); `--resume` continues an
interrupted protocol and SIGTERM/SIGUSR1 stop it after the current validation.
"""

from __future__ import annotations

import copy
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lsmfm.baselines2d.build import build_model, count_parameters, prepare, save_adapted
from lsmfm.baselines2d.config import Baseline2DConfig
from lsmfm.baselines2d.data import Case, load_splits
from lsmfm.baselines2d.evaluate import METRICS, write_mask
from lsmfm.baselines2d.task import SliceModel, SliceTask
from lsmfm.device import PeakMemory, resolve_device
from lsmfm.errors import InputError
from lsmfm.io.atomic import atomic_dir
from lsmfm.io.lock import output_lock
from lsmfm.tasks.base import Geometry
from lsmfm.signals import StopRequest
from lsmfm.tasks.protocol import Outcome, RunFolder, check_run_dir, run_pending
from lsmfm.tasks.results import FINETUNE, fewshot_subset, plot_metrics
from lsmfm.tasks.train import train_run

COMMAND = "lsmfm baseline2d"
NO_CROPS = Geometry((1, 1, 1), (1, 1, 1), 0.0)  # the slice task trains on whole slices


def check_training_cases(cases: list[Case], allow_empty: bool, source: str) -> None:
    """Constant training images, and training labels that are all empty, are refused with the files'
    names (empty labels: unless `segment.allow_empty`)."""
    constant = [c.name for c in cases if float(c.image.max()) == float(c.image.min())]
    if constant:
        raise InputError(source, f"{len(constant)} training image(s) are constant: "
                                 f"{', '.join(constant[:8])}; remove them from the training set")
    if not allow_empty and not any(c.label.any() for c in cases):
        raise InputError(source, f"every training label is empty ({', '.join(c.name for c in cases[:8])}): "
                                 "nothing to segment; add annotated images, or set segment.allow_empty=true")


def run_baseline(cfg: Baseline2DConfig, out_dir: str | Path, overwrite: bool = False, progress: bool = True,
                 resume: bool = False) -> Outcome:
    """All (shots, seed) runs into `out_dir` (its lock held throughout); returns the finished rows."""
    out_dir = Path(out_dir)
    check_run_dir(out_dir, COMMAND, overwrite, resume)
    splits = load_splits(cfg.data)
    source = f"{cfg.data.train_dir} (training cases)"
    check_training_cases(splits.train, cfg.segment.allow_empty, source)
    subsets = {(k, s): fewshot_subset(len(splits.train), k, s, source) for k in cfg.shots for s in cfg.seeds}
    device = resolve_device(cfg.train.device)
    base = build_model(cfg.model)
    task = SliceTask(cfg.segment, METRICS, batch_size=cfg.train.batch_size)
    runs = [(k, s, cfg.init) for k in cfg.shots for s in cfg.seeds]
    with output_lock(out_dir, COMMAND):
        check_run_dir(out_dir, COMMAND, overwrite, resume)
        if overwrite and out_dir.is_dir():
            shutil.rmtree(out_dir)
        folder = RunFolder(out_dir, COMMAND, FINETUNE, METRICS, runs)
        resumed = folder.start(cfg, resume)
        if resume:
            print(f"resuming {out_dir}: {len(resumed)} of {len(runs)} runs finished earlier, skipped",
                  flush=True)
        _discard_unfinished(folder, out_dir, cfg)

        def run_one(run: tuple, stop: StopRequest) -> tuple[dict[str, Any], dict] | None:
            shots, seed, _ = run
            return _run_one(cfg, base, task, splits, subsets[(shots, seed)], shots, seed, device, out_dir,
                            progress, stop)

        stopped = run_pending(folder, runs, run_one, f"{cfg.model.name}+{cfg.peft.method}", progress)
        rows = folder.ordered_rows()
        if rows:
            plot_metrics(out_dir, rows, METRICS, title=f"{cfg.model.name} + {cfg.peft.method}")
        return Outcome(rows, len(resumed), stopped)


def _run_one(cfg: Baseline2DConfig, base: Any, task: SliceTask, splits: Any, train: list[int], shots: int,
             seed: int, device: torch.device, out_dir: Path, progress: bool, stop: Any
             ) -> tuple[dict[str, Any], dict] | None:
    """Train and score one (shots, seed): its row and per-image scores; None when a signal interrupted it."""
    name = f"shots{shots}_seed{seed}"
    memory = PeakMemory(device)
    memory.reset()
    shutil.rmtree(out_dir / "tb" / name, ignore_errors=True)
    torch.manual_seed(seed)
    model = SliceModel(prepare(copy.deepcopy(base).to(device), cfg.peft).to(device))
    cases = [splits.train[i] for i in train]
    result = train_run(model, task, cases, splits.val, cfg.train.loop(), NO_CROPS, seed,
                       log_dir=out_dir / "tb" / name, desc=name, progress=progress, stop=stop)
    if result.interrupted:
        shutil.rmtree(out_dir / "tb" / name, ignore_errors=True)
        return None
    scores = task.score(model, splits.test)
    peak = memory.peak_mb()
    if cfg.save_predictions:
        with atomic_dir(out_dir / "predictions" / name, overwrite=True) as tmp:
            for mask, case in zip(scores.predictions, splits.test):
                write_mask(mask if case.is_3d else mask[0], tmp / f"{case.name}.tif")
    if (shots, seed) == (max(cfg.shots), cfg.seeds[0]):
        with atomic_dir(out_dir / "adapted", overwrite=True) as tmp:
            save_adapted(model.net, cfg, tmp)
    trainable, total = count_parameters(model.net)
    row = {"shots": shots, "seed": seed, "init": cfg.init, **scores.metrics,
           "val_dice": None if np.isnan(result.val_score) else result.val_score,
           "best_step": result.best_step,
           "model": cfg.model.name, "method": cfg.peft.method, "trainable_params": trainable,
           "total_params": total, "annotated_pixels": int(sum(c.label.size for c in cases)),
           "peak_memory_mb": round(peak, 1), "sec_per_iter": round(result.sec_per_iter, 4),
           "train_seconds": round(result.seconds, 2), "steps": result.steps,
           "train_cases": " ".join(c.name for c in cases)}
    return row, scores.per_image


def _discard_unfinished(folder: RunFolder, out_dir: Path, cfg: Baseline2DConfig) -> None:
    """What runs that did not finish left behind (a resumed folder): their predictions and adapter."""
    finished = {f"shots{r['shots']}_seed{r['seed']}" for r in folder.ordered_rows()}
    for path in (out_dir / "predictions").glob("shots*_seed*"):
        if path.name not in finished:
            folder.discard(path)
    if f"shots{max(cfg.shots)}_seed{cfg.seeds[0]}" not in finished:
        folder.discard(out_dir / "adapted")
