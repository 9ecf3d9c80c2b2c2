"""The arms of a comparison, by kind (`ARMS`): how each builds a fresh model for a run, prepares its inputs,
trains it with the one training loop, scores the test volumes and saves what is kept.

- `pretrained`: a 3D backbone from `lsmfm.load_pretrained(source, **options)` with the task's head;
  its recorded normalisation and patch size (or `data.patch_size`), its BatchNorm statistics kept or
  re-estimated on the training images (`bn_stats`), scored with the sliding window.
- `scratch`: the same 3D architecture, patch size and normalisation as its reference pretrained arm
  (`like`), from random weights; without a pretrained arm, `backbone` and `data.patch_size`.
- `baseline2d`: a 2D foundation model adapted with a PEFT method (`lsmfm.baselines2d`), trained on the Z
  slices of exactly the run's training volumes, predicting every slice of each val/test volume; the
  stacked masks are scored with the same 3D metrics (segmentation only).

Every arm of a (shots, seed) gets the same training volumes, the seed's global RNG state before its
model is built, and the task's loss, validation and early stopping.
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Callable, ClassVar

import numpy as np
import torch
from torch import nn

from lsmfm.compare.config import ArmConfig, CompareConfig, arm_train
from lsmfm.data.normalize import NormalizeConfig
from lsmfm.errors import ConfigError, InputError
from lsmfm.io.atomic import atomic_dir
from lsmfm.tasks.base import Example, FinetuneTask, Geometry, Scores
from lsmfm.tasks.data import Patch, check_channels, check_fits
from lsmfm.tasks.train import TrainResult, train_run

SPLITS = ("train", "val", "test")


class Context:
    """What every arm of one comparison shares: the task, the config, the checked patches of each split,
    the device, and the task's examples per normalisation (prepared once)."""

    def __init__(self, task: FinetuneTask, cfg: CompareConfig, splits: dict[str, list[Patch]],
                 device: torch.device) -> None:
        self.task, self.cfg, self.splits, self.device = task, cfg, splits, device
        self._examples: dict[NormalizeConfig, dict[str, list[Example]]] = {}

    def examples(self, normalize: NormalizeConfig) -> dict[str, list[Example]]:
        if normalize not in self._examples:
            self._examples[normalize] = {s: [self.task.prepare(p, normalize) for p in self.splits[s]]
                                         for s in SPLITS}
        return self._examples[normalize]


class Arm:
    """Base of the arm kinds. `dims` is the results.csv `kind` column ("2d" or "3d")."""

    dims: ClassVar[str] = "3d"

    def __init__(self, cfg: ArmConfig, ctx: Context) -> None:
        self.cfg, self.ctx = cfg, ctx
        self.name = cfg.name
        self.train_cfg = arm_train(ctx.cfg, cfg)

    def prepare(self) -> None:
        """Build the inputs of every split (after all checks passed)."""

    def train(self, train: list[int], seed: int, log_dir: Path, desc: str, progress: bool,
              stop: Callable[[], bool]) -> tuple[nn.Module, TrainResult]:
        raise NotImplementedError

    def test(self, model: nn.Module) -> Scores:
        raise NotImplementedError

    def save(self, model: nn.Module, scores: Scores, target: Path, record: dict[str, Any]) -> None:
        raise NotImplementedError


class Volume3DArm(Arm):
    """A 3D backbone (pretrained or from scratch) with the task's head."""

    def __init__(self, cfg: ArmConfig, ctx: Context, backbone: Any, pretrained: nn.Module | None,
                 recorded: Any, normalize: NormalizeConfig, roi: tuple[int, int, int], origin: str) -> None:
        from lsmfm.tasks.fewshot import finetuned_model_config

        super().__init__(cfg, ctx)
        self.backbone_config, self.pretrained, self.normalize = backbone, pretrained, normalize
        data = ctx.cfg.data
        window = tuple(data.sw_size) if data.sw_size else roi
        self.geometry = Geometry(roi, window, data.sw_overlap)  # type: ignore[arg-type]
        check_channels(ctx.splits, backbone.in_channels)
        check_fits(ctx.splits["train"], roi, backbone, f"{origin}, arm {self.name}")
        check_fits([], self.geometry.window, backbone, "data.sw_size")
        self.model_config = finetuned_model_config(recorded, backbone, roi, normalize,
                                                   ctx.splits["train"][0].voxel_size)

    def prepare(self) -> None:
        self.examples = self.ctx.examples(self.normalize)

    def train(self, train: list[int], seed: int, log_dir: Path, desc: str, progress: bool,
              stop: Callable[[], bool]) -> tuple[nn.Module, TrainResult]:
        from lsmfm.models.backbones.registry import build_backbone
        from lsmfm.tasks.models import build_task_model

        task = self.ctx.task
        torch.manual_seed(seed)
        backbone = copy.deepcopy(self.pretrained) if self.pretrained is not None else \
            build_backbone(self.backbone_config)
        model = build_task_model(task.name, backbone, task.head_config()).to(self.ctx.device)
        examples = [self.examples["train"][i] for i in train]
        task.begin_run(examples)
        result = train_run(model, task, examples, self.examples["val"], self.train_cfg, self.geometry, seed,
                           log_dir=log_dir, desc=desc, progress=progress, stop=stop)
        return model, result

    def test(self, model: nn.Module) -> Scores:
        return self.ctx.task.score(model, self.examples["test"], self.geometry.window, self.geometry.overlap)

    def save(self, model: nn.Module, scores: Scores, target: Path, record: dict[str, Any]) -> None:
        from lsmfm.tasks.models import save_task_model

        task = self.ctx.task
        with atomic_dir(target, overwrite=True) as tmp:
            save_task_model(model, tmp / "model", self.model_config, finetuning=record, **task.model_fields())
            (tmp / "predictions").mkdir()
            task.write_predictions(scores, self.examples["test"], tmp / "predictions",
                                   self.ctx.cfg.prediction_format)


def pretrained_arm(cfg: ArmConfig, ctx: Context, others: dict[str, Arm]) -> Volume3DArm:
    """Load the backbone once (every run finetunes a copy); its recorded normalisation and patch size."""
    import lsmfm

    net = lsmfm.load_pretrained(cfg.source, **cfg.options)
    if cfg.scale == "pretraining":
        from lsmfm.tasks.fewshot import at_pretraining_scale

        at_pretraining_scale(net, cfg.source)
    recorded = net.lsmfm_config
    data = ctx.cfg.data
    roi = tuple(data.patch_size) if data.patch_size else tuple(int(s) for s in recorded.patch_size)
    origin = "data.patch_size" if data.patch_size else f"patch size of the pretrained model {cfg.source}"
    if cfg.bn_stats == "reestimate":
        from lsmfm.tasks.fewshot import reestimate_statistics

        recorded = reestimate_statistics(net, ctx.splits["train"], recorded.normalize, roi)  # type: ignore
    return Volume3DArm(cfg, ctx, recorded.backbone, net, recorded, recorded.normalize, roi, origin)  # type: ignore


def scratch_arm(cfg: ArmConfig, ctx: Context, others: dict[str, Arm]) -> Volume3DArm:
    """The reference pretrained arm's architecture, patch size and normalisation, random weights."""
    ref_cfg = ctx.cfg.reference(cfg)
    if ref_cfg is not None:
        ref = others[ref_cfg.name]
        assert isinstance(ref, Volume3DArm)
        return Volume3DArm(cfg, ctx, ref.backbone_config, None, None, ref.normalize, ref.geometry.patch,
                           f"patch size of arm {ref.name}")
    if not ctx.cfg.data.patch_size:
        raise ConfigError(f"arm {cfg.name!r}: data.patch_size is required for a scratch arm when no "
                          "pretrained arm is given")
    roi = tuple(ctx.cfg.data.patch_size)
    return Volume3DArm(cfg, ctx, ctx.cfg.backbone, None, None, ctx.cfg.normalize or NormalizeConfig(),
                       roi, "data.patch_size")  # type: ignore[arg-type]


class Baseline2DArm(Arm):
    """A 2D foundation model + PEFT method on the Z slices of the volumes (see `lsmfm.baselines2d.task`)."""

    dims = "2d"

    def __init__(self, cfg: ArmConfig, ctx: Context, others: dict[str, Arm]) -> None:
        from lsmfm.baselines2d.build import build_model
        from lsmfm.baselines2d.task import SliceTask

        super().__init__(cfg, ctx)
        if ctx.task.name != "segment":
            raise ConfigError(f"arm {cfg.name!r}: the 2D baselines are segmentation models; "
                              f"`lsmfm compare {ctx.task.name}` takes pretrained and scratch arms")
        for patches in ctx.splits.values():
            for p in patches:
                if p.image.shape[0] != 1:
                    raise InputError(p.path, f"image has {p.image.shape[0]} channels; the 2D arm "
                                             f"{cfg.name!r} reads single-channel volumes")
        assert cfg.model is not None and cfg.peft is not None
        self.base = build_model(cfg.model)
        self.normalize = cfg.normalize or NormalizeConfig()
        self.slice_task = SliceTask(ctx.cfg.segment, ctx.task.metrics, batch_size=self.train_cfg.batch_size)
        self.geometry = Geometry((1, 1, 1), (1, 1, 1), 0.0)  # whole slices: the slice task needs no crops

    def prepare(self) -> None:
        from lsmfm.baselines2d.data import Case
        from lsmfm.data.normalize import percentile_normalize

        self.cases = {split: [Case(p.stem, np.asarray(percentile_normalize(p.image[0], self.normalize)),
                                   np.asarray(p.label, dtype=np.int32), True) for p in patches]
                      for split, patches in self.ctx.splits.items()}

    def train(self, train: list[int], seed: int, log_dir: Path, desc: str, progress: bool,
              stop: Callable[[], bool]) -> tuple[nn.Module, TrainResult]:
        from lsmfm.baselines2d.build import prepare
        from lsmfm.baselines2d.task import SliceModel

        torch.manual_seed(seed)
        assert self.cfg.peft is not None
        model = SliceModel(prepare(copy.deepcopy(self.base).to(self.ctx.device), self.cfg.peft))
        cases = [self.cases["train"][i] for i in train]
        result = train_run(model, self.slice_task, cases, self.cases["val"], self.train_cfg, self.geometry,
                           seed, log_dir=log_dir, desc=desc, progress=progress, stop=stop)
        return model, result

    def test(self, model: nn.Module) -> Scores:
        return self.slice_task.score(model, self.cases["test"])

    def save(self, model: nn.Module, scores: Scores, target: Path, record: dict[str, Any]) -> None:
        """`adapted/` (the resolved baseline2d config and the trained parameters, `load_adapted` rebuilds
        the model) and the stacked test masks in `predictions/`, named as the 3D arms' ones."""
        from lsmfm.baselines2d.build import save_adapted
        from lsmfm.baselines2d.config import Baseline2DConfig
        from lsmfm.tasks.outputs import write_prediction

        assert self.cfg.model is not None and self.cfg.peft is not None
        settings = Baseline2DConfig(model=self.cfg.model, peft=self.cfg.peft, shots=[record["shots"]],
                                    seeds=[record["seed"]], segment=self.ctx.cfg.segment)
        with atomic_dir(target, overwrite=True) as tmp:
            save_adapted(model.net, settings, tmp / "adapted")  # type: ignore[attr-defined]
            (tmp / "predictions").mkdir()
            for mask, patch in zip(scores.predictions, self.ctx.splits["test"]):
                write_prediction(mask, patch, tmp / "predictions", "pred", self.ctx.cfg.prediction_format)


ARMS: dict[str, Callable[[ArmConfig, Context, dict[str, Arm]], Arm]] = {
    "pretrained": pretrained_arm,
    "scratch": scratch_arm,
    "baseline2d": Baseline2DArm,
}


def build_arms(cfg: CompareConfig, ctx: Context) -> list[Arm]:
    """Every arm, checked against the data, in config order (pretrained arms are built first, so a
    scratch arm can copy its reference)."""
    built: dict[str, Arm] = {}
    for arm in sorted(cfg.arms, key=lambda a: a.kind != "pretrained"):
        built[arm.name] = ARMS[arm.kind](arm, ctx, built)
    return [built[a.name] for a in cfg.arms]
