"""Binary segmentation: Dice + BCE (or focal) + soft-clDice; scored by Dice, clDice and IoU on whole images.

Foreground is label 1 (or label > 0 with `segment.binarize`); for the sample data the patches of all
structures train one foreground/background model. Predictions are sigmoid probabilities thresholded at
`segment.threshold` (0.5). Half of the training crops are centred on a foreground voxel, so sparse
structures (plaques: 0.2 % of the voxels) are seen at all.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from torch import nn

from lsmfm.data.normalize import NormalizeConfig, normalize_channels
from lsmfm.errors import InputError
from lsmfm.tasks.base import BioimageioOutput, Example, FinetuneTask, Scores, sliding_window
from lsmfm.tasks.config import DataConfig, FinetuneConfig
from lsmfm.tasks.data import Patch, load_split
from lsmfm.tasks.outputs import write_prediction

MAX_FOREGROUND_POINTS = 20000
EMPTY_HINT = "add annotated volumes, or set segment.allow_empty=true to train on background only"


def _names(patches: list[Patch]) -> str:
    shown = ", ".join(f"{p.path.name} (label)" for p in patches[:6])
    return shown + (f", ... ({len(patches) - 6} more)" if len(patches) > 6 else "")


@dataclass
class SegmentConfig:
    """Binary segmentation: Dice + BCE (or focal) + soft-clDice on foreground = label.

    Args:
        allow_empty: accept runs whose training labels are all empty (background-only training);
            otherwise such a (shots, seed) is refused with the label files.
    """

    binarize: bool = False
    dice_weight: float = 1.0
    bce_weight: float = 1.0
    focal: bool = False
    cldice_weight: float = 0.5
    cldice_iters: int = 3
    threshold: float = 0.5
    allow_empty: bool = False

    def __post_init__(self) -> None:
        weights = (self.dice_weight, self.bce_weight, self.cldice_weight)
        if min(weights) < 0 or sum(weights) <= 0:
            raise ValueError(f"segment loss weights must be >= 0 with a positive sum, got {weights}")
        if self.cldice_iters < 0 or not 0.0 < self.threshold < 1.0:
            raise ValueError("segment.cldice_iters must be >= 0 and segment.threshold in (0, 1)")


@dataclass
class SegmentFinetuneConfig(FinetuneConfig):
    segment: SegmentConfig = field(default_factory=SegmentConfig)


@dataclass
class SegmentHeadConfig:
    """A 1x1x1 conv from the dense features to `out_channels` logits (1: binary segmentation)."""

    out_channels: int = 1

    def __post_init__(self) -> None:
        if self.out_channels < 1:
            raise ValueError(f"head out_channels must be >= 1, got {self.out_channels}")


class SegmentTask(FinetuneTask):
    name = "segment"
    summary = "binary segmentation (Dice + BCE/focal + soft-clDice)"
    config_class = SegmentFinetuneConfig
    head_class = SegmentHeadConfig
    metrics = ("dice", "cldice", "iou")
    val_metric = "dice"
    foreground_crops = 0.5
    volume_output = "mask"

    def __init__(self, cfg: SegmentConfig) -> None:
        from lsmfm.losses.segmentation import SegmentationLoss

        super().__init__(cfg)
        self.loss_fn = SegmentationLoss(dice_weight=cfg.dice_weight, bce_weight=cfg.bce_weight,
                                        focal=cfg.focal, cldice_weight=cfg.cldice_weight,
                                        cldice_iters=cfg.cldice_iters)

    def load_split(self, data: DataConfig, split: str) -> list[Patch]:
        return load_split(data, split, label=True, binarize=self.cfg.binarize)

    def setup(self, train: list[Patch], others: list[Patch]) -> None:
        """Training labels that are all empty leave nothing to segment: refused, naming the images
        (unless `segment.allow_empty`)."""
        if not self.cfg.allow_empty and not any(p.label.any() for p in train):  # type: ignore[union-attr]
            raise InputError(train[0].path.parent, f"every training label is empty ({_names(train)}): "
                             f"nothing to segment; {EMPTY_HINT}")

    def subset(self, patches: list[Patch], shots: int, seed: int, source: str) -> list[int]:
        """The (shots, seed) patches; a run whose training labels are all empty is refused the same way."""
        picked = super().subset(patches, shots, seed, source)
        if not self.cfg.allow_empty and not any(patches[i].label.any() for i in picked):  # type: ignore
            raise InputError(source, f"shots={shots} seed={seed} draws only volumes with empty labels "
                                     f"({_names([patches[i] for i in picked])}); {EMPTY_HINT}")
        return picked

    @classmethod
    def build_head(cls, feature_dim: int, in_channels: int, head: SegmentHeadConfig) -> nn.Module:
        return nn.Conv3d(feature_dim, head.out_channels, kernel_size=1)

    @classmethod
    def card_lines(cls, task: Mapping[str, Any]) -> list[str]:
        return [f"Mask threshold on the foreground probability: {task['threshold']}"]

    @classmethod
    def bioimageio_output(cls, task: Mapping[str, Any], head_cfg: SegmentHeadConfig, in_channels: int
                          ) -> BioimageioOutput:
        return BioimageioOutput("mask", f"foreground mask: sigmoid probability > {task['threshold']}",
                                ("foreground",), residual=False,
                                tags=("segmentation", "semantic-segmentation"))

    @classmethod
    def predict_problem(cls, head_cfg: SegmentHeadConfig) -> str | None:
        if head_cfg.out_channels != 1:
            return (f"segment model has {head_cfg.out_channels} output channels; predict supports binary "
                    "segmentation (1 channel)")
        return None

    def head_config(self) -> SegmentHeadConfig:
        return SegmentHeadConfig(out_channels=1)

    def model_fields(self) -> dict[str, Any]:
        return {"threshold": self.cfg.threshold}

    def prepare(self, patch: Patch, normalize: NormalizeConfig) -> Example:
        assert patch.label is not None
        points = np.argwhere(patch.label > 0)
        if len(points) > MAX_FOREGROUND_POINTS:
            keep = np.random.default_rng(0).choice(len(points), MAX_FOREGROUND_POINTS, replace=False)
            points = points[keep]
        return Example(patch, normalize_channels(patch.image, normalize),
                       patch.label[None].astype(np.float32), foreground=points)

    def loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.loss_fn(output, target)

    def score(self, model: nn.Module, examples: list[Example], roi: tuple[int, int, int], overlap: float
              ) -> Scores:
        from lsmfm.metrics.segmentation import cldice_score, dice_score, iou_score

        per_image, masks = [], []
        for ex in examples:
            prob = torch.sigmoid(sliding_window(model, ex.input, roi, overlap))[0].numpy()
            mask = (prob > self.cfg.threshold).astype(np.uint8)
            truth = ex.patch.label
            per_image.append({"stem": ex.patch.stem, "dice": dice_score(mask, truth),
                              "cldice": cldice_score(mask, truth), "iou": iou_score(mask, truth)})
            masks.append(mask)
        metrics = {m: float(np.mean([r[m] for r in per_image])) for m in self.metrics}
        return Scores(metrics, per_image, masks)

    def write_predictions(self, scores: Scores, examples: list[Example], out_dir: Path, fmt: str) -> None:
        for mask, ex in zip(scores.predictions, examples):
            write_prediction(mask, ex.patch, out_dir, "pred", fmt)
