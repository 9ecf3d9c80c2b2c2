"""`lsmfm compare TASK`: every arm trained and scored under one few-shot protocol, into one run folder.

`plan_compare` reads and checks the data (shapes, labels, degenerate images), loads every pretrained
source and builds every 2D model, and draws the training volumes of each (shots, seed) once for all
arms, before anything is written. `run_compare` then trains the runs (for each shots, seed: every arm)
and writes, after every run:

    RUN_DIR/config.yaml                the resolved config
    RUN_DIR/results.csv                one row per (arm, shots, seed): kind (2d|3d), test metrics,
                                       val score, steps, trainable_params, annotated_voxels,
                                       train_seconds, sec_per_iter, peak_memory_mb, train_patches
    RUN_DIR/metrics.json               the rows, and mean/std/min/max across seeds per (arm, shots)
    RUN_DIR/per_image.csv              test metrics of every volume in every run
    RUN_DIR/results.md                 the Markdown table (mean ± std across seeds)
    RUN_DIR/<metric>_vs_shots.png      every arm versus shots: mean line, min-max band, a dot per seed
    RUN_DIR/tb/<arm>_shots<k>_seed<s>/ TensorBoard logs of each run
    RUN_DIR/<arm>/shots<k>_seed<s>/    kept runs: model/ (3D arms: a finetuned model folder) or
                                       adapted/ (2D arms), and predictions/ of the test volumes

Resume, signals and the run-folder rules are those of `lsmfm.tasks.protocol`.
"""
from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lsmfm.compare.arms import SPLITS, Arm, Context, build_arms
from lsmfm.compare.config import CompareConfig
from lsmfm.compare.report import LAYOUT
from lsmfm.device import PeakMemory, resolve_device
from lsmfm.io.lock import output_lock
from lsmfm.tasks.base import FinetuneTask
from lsmfm.signals import StopRequest
from lsmfm.tasks.protocol import (Outcome, RunFolder, check_run_dir, keep_run, restore_kept, run_dir_of,
                                  run_pending)


def command(task: str) -> str:
    return f"lsmfm compare {task}"


@dataclass
class ComparePlan:
    """The checked comparison: task, config, arms, the training volumes of each (shots, seed), the runs."""

    task: FinetuneTask
    cfg: CompareConfig
    arms: list[Arm]
    context: Context
    subsets: dict[tuple[int, int], list[int]]
    runs: list[tuple[int, int, Arm]] = field(default_factory=list)

    def key(self, shots: int, seed: int, arm: Arm) -> tuple[str, str, int, int]:
        return (arm.name, arm.dims, shots, seed)


def plan_compare(task_name: str, cfg: CompareConfig) -> ComparePlan:
    """Load and check everything; raise before any output exists."""
    from lsmfm.tasks.data import check_training_images
    from lsmfm.tasks.registry import task_class

    task = task_class(task_name)(getattr(cfg, task_name))
    splits = {name: task.load_split(cfg.data, name) for name in SPLITS}
    task.setup(splits["train"], splits["val"] + splits["test"])
    check_training_images(splits["train"])
    context = Context(task, cfg, splits, resolve_device(cfg.device))
    arms = build_arms(cfg, context)
    source = cfg.data.train_dir or f"{cfg.data.catalog} (train_ids)"
    subsets = {(k, s): task.subset(splits["train"], k, s, source) for k in cfg.shots for s in cfg.seeds}
    runs = [(k, s, arm) for k in cfg.shots for s in cfg.seeds for arm in arms]
    return ComparePlan(task, cfg, arms, context, subsets, runs)


def run_compare(plan: ComparePlan, out_dir: str | Path, progress: bool = True, overwrite: bool = False,
                resume: bool = False) -> Outcome:
    """Train and score every run of `plan` into `out_dir` (its lock held throughout); with `resume`,
    the finished runs of an earlier start are skipped."""
    out_dir = Path(out_dir)
    name = command(plan.task.name)
    with output_lock(out_dir, name):
        check_run_dir(out_dir, name, overwrite, resume)
        if overwrite and out_dir.is_dir():
            shutil.rmtree(out_dir)
        folder = RunFolder(out_dir, name, LAYOUT, plan.task.metrics, [plan.key(*r) for r in plan.runs])
        resumed = folder.start(plan.cfg, resume)
        if resume:
            print(f"resuming {out_dir}: {len(resumed)} of {len(plan.runs)} runs finished earlier, skipped"
                  + (f" ({', '.join(_run_name(k) for k in resumed)})" if resumed else ""), flush=True)
        kept = restore_kept(folder, out_dir, plan.cfg.keep, f"val_{plan.task.val_metric}")
        for arm in plan.arms:
            arm.prepare()
        stopped = _run_all(plan, folder, out_dir, kept, progress)
        _report(plan, folder, out_dir)
        return Outcome(folder.ordered_rows(), len(resumed), stopped)


def _run_name(key: tuple) -> str:
    arm, _, shots, seed = key
    return f"{arm}_shots{shots}_seed{seed}"


def _run_all(plan: ComparePlan, folder: RunFolder, out_dir: Path, kept: dict[tuple, dict[str, Any]],
             progress: bool) -> bool:
    """Run what is not finished; True when a signal stopped the protocol."""
    memory = PeakMemory(plan.context.device)

    def run_one(run: tuple, stop: StopRequest) -> tuple[dict[str, Any], Any] | None:
        shots, seed, arm = run
        name = _run_name(plan.key(shots, seed, arm))
        folder.discard(out_dir / "tb" / name)
        memory.reset()
        train = plan.subsets[(shots, seed)]
        model, result = arm.train(train, seed, out_dir / "tb" / name, name, progress, stop)
        if result.interrupted:
            folder.discard(out_dir / "tb" / name)
            return None
        scores = arm.test(model)
        row = _row(plan, arm, shots, seed, train, result, scores.metrics, memory.peak_mb())
        _keep(plan, arm, out_dir, kept, row, model, scores)
        return row, scores.per_image

    return run_pending(folder, plan.runs, run_one, f"compare {plan.task.name}", progress,
                       key=lambda run: plan.key(*run))


def _row(plan: ComparePlan, arm: Arm, shots: int, seed: int, train: list[int], result: Any,
         metrics: dict[str, float], peak_mb: float) -> dict[str, Any]:
    patches = [plan.context.splits["train"][i] for i in train]
    return {"arm": arm.name, "kind": arm.dims, "shots": shots, "seed": seed, **metrics,
            f"val_{plan.task.val_metric}": result.val_score, "best_step": result.best_step,
            "steps": result.steps, "trainable_params": result.trainable_params,
            "annotated_voxels": int(sum(p.image[0].size for p in patches)),
            "train_seconds": round(result.seconds, 2), "sec_per_iter": round(result.sec_per_iter, 4),
            "peak_memory_mb": round(peak_mb, 1), "train_patches": " ".join(p.stem for p in patches)}


def _keep(plan: ComparePlan, arm: Arm, out_dir: Path, kept: dict[tuple, dict[str, Any]], row: dict[str, Any],
          model: Any, scores: Any) -> None:
    """Save the run if keep=all, or if it is the best-validated seed of its (arm, shots) so far."""
    keep_run(kept, (arm.name, row["shots"]), row[f"val_{plan.task.val_metric}"], plan.cfg.keep,
             run_dir_of(out_dir, arm.name, row["shots"], row["seed"]),
             lambda target: arm.save(model, scores, target, _record(plan, arm, row, scores, out_dir)))


def _record(plan: ComparePlan, arm: Arm, row: dict[str, Any], scores: Any, out_dir: Path) -> dict[str, Any]:
    data = plan.cfg.data
    source = (f"{data.catalog} (train {', '.join(data.train_ids)})" if data.catalog else
              f"train {data.train_dir}, validation {data.val_dir}, test {data.test_dir}")
    return {"base_model": arm.cfg.source or None, "init": arm.cfg.kind, "arm": arm.name,
            "shots": int(row["shots"]), "seed": int(row["seed"]),
            "train_patches": row["train_patches"].split(), "data": source,
            "test_metrics": {k: float(v) for k, v in scores.metrics.items()}, "run": str(out_dir)}


def _report(plan: ComparePlan, folder: RunFolder, out_dir: Path) -> None:
    """Plots, the Markdown table and the kept 3D models' cards, from the finished rows."""
    from lsmfm.compare.report import markdown_table
    from lsmfm.io.atomic import atomic_write_text
    from lsmfm.tasks.fewshot import refresh_cards
    from lsmfm.tasks.results import plot_metrics

    rows = folder.ordered_rows()
    if not rows:
        return
    metrics = plan.task.metrics
    dashed = [a.name for a in plan.arms if a.dims == "2d"]
    title = f"{plan.task.name} on the test volumes: mean, min-max and each seed"
    plot_metrics(out_dir, rows, metrics, title=title, layout=LAYOUT, dashed=dashed)
    atomic_write_text(out_dir / "results.md", markdown_table(rows, metrics) + "\n")
    refresh_cards(out_dir, rows, metrics, LAYOUT)
