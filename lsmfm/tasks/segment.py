"""Binary segmentation: Dice + BCE (or focal) + soft-clDice; scored by Dice, clDice and IoU on whole images.

Foreground is label 1 (or label > 0 with `segment.binarize`); for the sample data the patches of all
structures train one foreground/background model. Predictions are sigmoid probabilities thresholded at
`segment.threshold` (0.5). Half of the training crops are centred on a foreground voxel, so sparse
structures (plaques: 0.2 % of the voxels) are seen at all.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from lsmfm.data.normalize import NormalizeConfig, normalize_channels
from lsmfm.tasks.base import Example, FinetuneTask, Scores, sliding_window
from lsmfm.tasks.config import DataConfig, SegmentConfig
from lsmfm.tasks.data import Patch, load_split
from lsmfm.tasks.models import HeadConfig
from lsmfm.tasks.outputs import write_prediction

MAX_FOREGROUND_POINTS = 20000


class SegmentTask(FinetuneTask):
    name = "segment"
    metrics = ("dice", "cldice", "iou")
    val_metric = "dice"
    foreground_crops = 0.5

    def __init__(self, cfg: SegmentConfig) -> None:
        from lsmfm.losses.segmentation import SegmentationLoss

        self.cfg = cfg
        self.loss_fn = SegmentationLoss(dice_weight=cfg.dice_weight, bce_weight=cfg.bce_weight,
                                        focal=cfg.focal, cldice_weight=cfg.cldice_weight,
                                        cldice_iters=cfg.cldice_iters)

    def load_split(self, data: DataConfig, split: str) -> list[Patch]:
        return load_split(data, split, label=True, binarize=self.cfg.binarize)

    def head_config(self) -> HeadConfig:
        return HeadConfig(out_channels=1)

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
