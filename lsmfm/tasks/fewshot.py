"""The few-shot protocol: every (shots, seed, init) trained with the same budget and scored on the test set.

`plan_fewshot` loads the pretrained model and every patch and checks them (shapes, labels, shots against
the training set, patch size against the data) before anything is written. `run_fewshot` then writes:

    RUN_DIR/config.yaml               the resolved config
    RUN_DIR/results.csv               one row per (shots, seed, init): test metrics, val score, steps
    RUN_DIR/metrics.json              the rows and mean/std/min/max across seeds per (init, shots)
    RUN_DIR/per_image.csv             test metrics of every image in every run
    RUN_DIR/<metric>_vs_shots.png     each metric versus shots, pretrained against scratch, min-max spread
    RUN_DIR/tb/<init>_shots<k>_seed<s>/   TensorBoard logs of each run
    RUN_DIR/<init>/shots<k>_seed<s>/  kept runs: model/ (safetensors + config.json, head included) and
                                      predictions/ of the test set (keep=best: the best-validated seed
                                      per (shots, init); keep=all: every run)

results.csv, metrics.json and per_image.csv are rewritten (atomically) after every run, so an interrupted
protocol leaves the finished runs readable; `--resume` continues it and SIGTERM/SIGUSR1 stop it after the
current validation (`lsmfm.tasks.protocol`).
"""
from __future__ import annotations

import copy
import dataclasses
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from lsmfm.data.normalize import NormalizeConfig
from lsmfm.device import resolve_device
from lsmfm.errors import ConfigError
from lsmfm.io.atomic import atomic_dir, atomic_write_text
from lsmfm.io.lock import output_lock
from lsmfm.models.backbones.registry import BackboneConfig, build_backbone
from lsmfm.tasks.base import Example, FinetuneTask, Geometry, Scores
from lsmfm.tasks.config import FinetuneConfig
from lsmfm.tasks.data import Patch, check_channels, check_fits, check_training_images
from lsmfm.tasks.registry import task_class
from lsmfm.signals import StopRequest
from lsmfm.tasks.protocol import (Outcome, RunFolder, check_run_dir, keep_run, restore_kept, run_dir_of,
                                  run_pending)
from lsmfm.tasks.results import FINETUNE, Layout, plot_metrics



def build_task(task: str, cfg: FinetuneConfig) -> FinetuneTask:
    """The task object for `task` (a registered name), configured by its section of `cfg`."""
    return task_class(task)(getattr(cfg, task))


@dataclass
class Plan:
    """Everything a protocol run needs, checked: the task, data, backbone source and run list."""

    task: FinetuneTask
    cfg: FinetuneConfig
    backbone_config: BackboneConfig
    model_config: Any  # lsmfm.weights ModelConfig template of the finetuned models
    normalize: NormalizeConfig
    geometry: Geometry
    splits: dict[str, list[Patch]]
    subsets: dict[tuple[int, int], list[int]]
    pretrained: nn.Module | None = None
    runs: list[tuple[int, int, str]] = field(default_factory=list)
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))


def plan_fewshot(task_name: str, cfg: FinetuneConfig) -> Plan:
    """Load and check the pretrained model and every patch; raise before any output exists."""
    task = build_task(task_name, cfg)
    device = resolve_device(cfg.device)
    pretrained = _load_pretrained(cfg)
    if cfg.scale == "pretraining":
        at_pretraining_scale(pretrained, cfg.pretrained)
    recorded = pretrained.lsmfm_config if pretrained is not None else None
    backbone_cfg = recorded.backbone if recorded is not None else cfg.backbone
    normalize = _normalize(cfg, recorded)
    roi, origin = _roi(cfg, recorded)
    geometry = Geometry(roi, tuple(cfg.data.sw_size) if cfg.data.sw_size else roi, cfg.data.sw_overlap)
    splits = {name: task.load_split(cfg.data, name) for name in ("train", "val", "test")}
    task.setup(splits["train"], splits["val"] + splits["test"])
    check_training_images(splits["train"])
    check_channels(splits, backbone_cfg.in_channels)
    check_fits(splits["train"], roi, backbone_cfg, origin)
    check_fits([], geometry.window, backbone_cfg, "data.sw_size")
    if cfg.bn_stats == "reestimate" and pretrained is not None:
        recorded = reestimate_statistics(pretrained, splits["train"], normalize, roi)
    source = cfg.data.train_dir or f"{cfg.data.catalog} (train_ids)"
    subsets = {(k, s): task.subset(splits["train"], k, s, source) for k in cfg.shots for s in cfg.seeds}
    model_config = finetuned_model_config(recorded, backbone_cfg, roi, normalize,
                                          splits["train"][0].voxel_size)
    runs = [(k, s, init) for k in cfg.shots for s in cfg.seeds for init in cfg.inits]
    return Plan(task, cfg, backbone_cfg, model_config, normalize, geometry, splits, subsets, pretrained, runs,
                device)


def _load_pretrained(cfg: FinetuneConfig) -> nn.Module | None:
    if not cfg.pretrained:
        return None
    import lsmfm

    return lsmfm.load_pretrained(cfg.pretrained, which=cfg.which)


def at_pretraining_scale(pretrained: nn.Module | None, source: str) -> None:
    """Make the backbone resize its inputs as its pretraining did (`pretraining.resize`: read -> network)."""
    resize = (pretrained.lsmfm_config.pretraining.get("resize") if pretrained is not None else None) or {}
    factors = {n / r for n, r in zip(resize.get("network", []), resize.get("read", []))}
    if len(factors) != 1:
        raise ConfigError(f"scale: pretraining needs a pretrained model that records one isotropic "
                          f"pretraining resize (pretraining.resize: read -> network); {source or 'none'} "
                          f"records {resize or 'none'}")
    config = pretrained.lsmfm_config
    backbone = dataclasses.replace(config.backbone, input_scale=factors.pop())
    pretrained.config = backbone
    pretrained.lsmfm_config = dataclasses.replace(config, backbone=backbone,
                                                  patch_size=list(resize["read"]))


def reestimate_statistics(pretrained: nn.Module, train: list[Any], normalize: NormalizeConfig,
                roi: tuple[int, int, int]) -> Any:
    """BatchNorm statistics from windows of the training images (labels unused); the returned config
    records it, so every finetuned model says which statistics it started from."""
    from lsmfm.data.normalize import normalize_channels
    from lsmfm.models.batchnorm import image_windows, reestimate_batchnorm

    windows = image_windows((normalize_channels(p.image, normalize) for p in train), roi)
    used = reestimate_batchnorm(pretrained, windows)
    config = pretrained.lsmfm_config
    pre = {**config.pretraining, "batchnorm": {"reestimated_on": f"{used} windows of {roi} voxels from "
                                                                   f"{len(train)} training image(s)"}}
    pretrained.lsmfm_config = dataclasses.replace(config, pretraining=pre)
    return pretrained.lsmfm_config


def _normalize(cfg: FinetuneConfig, recorded: Any) -> NormalizeConfig:
    """The pretrained model's recorded normalisation; an explicit different one is an error."""
    if recorded is not None and cfg.normalize is not None and cfg.normalize != recorded.normalize:
        raise ConfigError(f"normalize {cfg.normalize} differs from the pretrained model's "
                          f"{recorded.normalize} ({cfg.pretrained}); finetuning must normalise as "
                          "pretraining did: drop `normalize`")
    if recorded is not None:
        return recorded.normalize
    return cfg.normalize or NormalizeConfig()


def _roi(cfg: FinetuneConfig, recorded: Any) -> tuple[tuple[int, int, int], str]:
    if cfg.data.patch_size:
        return tuple(cfg.data.patch_size), "data.patch_size"  # type: ignore[return-value]
    if recorded is not None:
        origin = f"patch size of the pretrained model {cfg.pretrained}"
        return tuple(int(s) for s in recorded.patch_size), origin  # type: ignore[return-value]
    raise ConfigError("data.patch_size is required when no pretrained model is given")


def finetuned_model_config(recorded: Any, backbone_cfg: BackboneConfig, roi: tuple[int, int, int],
                           normalize: NormalizeConfig, voxel_size: tuple[float, float, float]) -> Any:
    """What the finetuned models record: the pretrained model's config (provenance, voxel size) with
    this run's patch size, or a fresh one for scratch-only runs."""
    from lsmfm.weights.format import ModelConfig

    if recorded is not None:
        return dataclasses.replace(recorded, patch_size=list(roi), normalize=normalize)
    return ModelConfig(backbone=backbone_cfg, patch_size=list(roi), voxel_size=list(voxel_size),
                       normalize=normalize)


def command(task: str) -> str:
    """The command that made a finetune run folder (its `.lsmfm-protocol` marker)."""
    return f"lsmfm finetune {task}"


def run_fewshot(plan: Plan, out_dir: str | Path, progress: bool = True, overwrite: bool = False,
                resume: bool = False) -> Outcome:
    """Train and score every (shots, seed, init) of `plan`; returns the finished rows (results.csv).
    `overwrite` first removes an earlier finetune run in `out_dir`, `resume` continues it (see
    `lsmfm.tasks.protocol`). RUN_DIR's lock (`lsmfm.io.lock`) is held throughout: a second run into the
    same folder is refused."""
    out_dir = Path(out_dir)
    with output_lock(out_dir, "lsmfm finetune"):
        name = command(plan.task.name)
        check_run_dir(out_dir, name, overwrite, resume)
        if overwrite and out_dir.is_dir():
            shutil.rmtree(out_dir)
        folder = RunFolder(out_dir, name, FINETUNE, plan.task.metrics, plan.runs)
        resumed = folder.start(plan.cfg, resume)
        if resume:
            print(f"resuming {out_dir}: {len(resumed)} of {len(plan.runs)} runs finished earlier, skipped",
                  flush=True)
        kept = restore_kept(folder, out_dir, plan.cfg.keep, f"val_{plan.task.val_metric}")
        stopped = _run_all(plan, folder, out_dir, kept, progress)
        rows = folder.ordered_rows()
        if rows:
            plot_metrics(out_dir, rows, plan.task.metrics, title=f"{plan.task.name}: pretrained vs scratch")
            refresh_cards(out_dir, rows, plan.task.metrics)
        return Outcome(rows, len(resumed), stopped)


def _run_all(plan: Plan, folder: RunFolder, out_dir: Path, kept: dict[tuple, dict[str, Any]],
             progress: bool) -> bool:
    """Run what is not finished; True when a signal stopped the protocol."""
    examples = {name: [plan.task.prepare(p, plan.normalize) for p in patches]
                for name, patches in plan.splits.items()}

    def run_one(run: tuple, stop: StopRequest) -> tuple[dict[str, Any], Any] | None:
        shots, seed, init = run
        name = f"{init}_shots{shots}_seed{seed}"
        folder.discard(out_dir / "tb" / name)
        train = [examples["train"][i] for i in plan.subsets[(shots, seed)]]
        model, result = _train_one(plan, init, seed, train, examples["val"], out_dir / "tb" / name, name,
                                   progress, stop)
        if result.interrupted:
            folder.discard(out_dir / "tb" / name)
            return None
        scores = plan.task.score(model, examples["test"], plan.geometry.window, plan.geometry.overlap)
        row = {"shots": shots, "seed": seed, "init": init, **scores.metrics,
               f"val_{plan.task.val_metric}": result.val_score, "best_step": result.best_step,
               "steps": result.steps, "train_patches": " ".join(ex.patch.stem for ex in train)}
        _keep(plan, out_dir, kept, row, model, scores, examples["test"])
        return row, scores.per_image

    return run_pending(folder, plan.runs, run_one, f"finetune {plan.task.name}", progress)


def _train_one(plan: Plan, init: str, seed: int, train: list[Example], val: list[Example], log_dir: Path,
               desc: str, progress: bool = True, stop: Callable[[], bool] | None = None):
    from lsmfm.tasks.models import build_task_model
    from lsmfm.tasks.train import train_run

    torch.manual_seed(seed)
    if init == "pretrained":
        assert plan.pretrained is not None
        backbone = copy.deepcopy(plan.pretrained)
    else:
        backbone = build_backbone(plan.backbone_config)
    model = build_task_model(plan.task.name, backbone, plan.task.head_config()).to(plan.device)
    plan.task.begin_run(train)
    result = train_run(model, plan.task, train, val, plan.cfg.train, plan.geometry, seed, log_dir=log_dir,
                       desc=desc, progress=progress, stop=stop)
    return model, result


def _keep(plan: Plan, out_dir: Path, kept: dict[tuple, dict[str, Any]], row: dict[str, Any],
          model: nn.Module, scores: Scores, test: list[Example]) -> None:
    """Save the run's model and test predictions if keep=all, or if it is the best-validated seed so far."""
    keep_run(kept, (str(row["init"]), int(row["shots"])), row[f"val_{plan.task.val_metric}"], plan.cfg.keep,
             run_dir_of(out_dir, row["init"], row["shots"], row["seed"]),
             lambda target: save_run(plan, model, scores, test, target,
                                     finetuning_record(plan, row, scores, out_dir)))


def save_run(plan: Plan, model: nn.Module, scores: Scores, test: list[Example], target: Path,
             finetuning: dict[str, Any] | None = None) -> None:
    """`target/model` (finetuned model folder) and `target/predictions`, written atomically."""
    from lsmfm.tasks.models import save_task_model

    with atomic_dir(target, overwrite=True) as tmp:
        save_task_model(model, tmp / "model", plan.model_config, finetuning=finetuning,
                        **plan.task.model_fields())
        (tmp / "predictions").mkdir()
        plan.task.write_predictions(scores, test, tmp / "predictions", plan.cfg.prediction_format)


def pinned_source(plan: Plan) -> str:
    """The pretrained source as loaded: a Hub repository pinned to the commit it resolved to."""
    recorded = getattr(plan.pretrained, "lsmfm_config", None)
    return (recorded.pretraining.get("source") if recorded is not None else None) or plan.cfg.pretrained


def finetuning_record(plan: Plan, row: dict[str, Any], scores: Scores, out_dir: Path) -> dict[str, Any]:
    """What a kept model records about how it was made (`config.task["finetuning"]`, its model card)."""
    data = plan.cfg.data
    source = (f"{data.catalog} (train {', '.join(data.train_ids)})" if data.catalog else
              f"train {data.train_dir}, validation {data.val_dir}, test {data.test_dir}")
    return {"base_model": pinned_source(plan) if row["init"] == "pretrained" else None,
            "init": row["init"], "shots": int(row["shots"]), "seed": int(row["seed"]),
            "train_patches": str(row["train_patches"]).split(), "data": source,
            "test_metrics": {k: float(v) for k, v in scores.metrics.items()}, "run": str(out_dir)}


def refresh_cards(out_dir: Path, rows: list[dict[str, Any]], metrics: tuple[str, ...],
                  layout: Layout = FINETUNE) -> None:
    """Rewrite each kept model's card with the results table of the whole protocol (known at the end)."""
    from lsmfm.tasks.models import task_model_card
    from lsmfm.tasks.results import format_table
    from lsmfm.weights.format import CARD_NAME, read_model_dir

    table = "```text\n" + format_table(rows, list(metrics), layout) + "\n```"
    for folder in sorted(out_dir.glob("*/shots*_seed*/model")):
        config, state = read_model_dir(folder)
        atomic_write_text(folder / CARD_NAME, task_model_card(config, state, results_table=table))
