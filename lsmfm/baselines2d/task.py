"""The 2D baselines inside the one training loop (`lsmfm.tasks.train.train_run`): a 2D foundation model
trained on the 2D slices of its training cases and scored on whole cases, volumes stacked back to 3D.

`SliceModel` wraps an adapted `Segmenter2D` with what the loop asks of a model: its PEFT parameters
(what `prepare` left trainable) in one AdamW group at `train.lr`; no encoder phases (the method decides
what is frozen). `SliceTask` is the task side: batches of whole training slices (Z slices of volumes,
or 2D images), with half of them, as the 3D segmentation crops, drawn among slices that hold
foreground; random flips and, for square slices, 90-degree rotations; the segmentation loss of
`lsmfm finetune segment` (Dice + BCE or focal + soft-clDice with the 2D soft skeleton); and scores of
whole cases with the same metric functions (3D for volumes).

Only the slices of the cases passed as `train` are ever drawn: a shot is a whole annotated case for a
2D arm exactly as for a 3D one.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from lsmfm.baselines2d.data import Case
from lsmfm.baselines2d.evaluate import predict_case, score_case
from lsmfm.baselines2d.models.base import Segmenter2D
from lsmfm.tasks.base import Scores
from lsmfm.tasks.config import TrainConfig

FOREGROUND_SLICES = 0.5  # as lsmfm.tasks.segment.SegmentTask.foreground_crops


class SliceModel(nn.Module):
    """An adapted 2D segmenter as the training loop sees it: (B, 1, H, W) images in [0, 1] to logits."""

    def __init__(self, net: Segmenter2D) -> None:
        super().__init__()
        self.net = net

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net.logits(images)

    def param_groups(self, cfg: TrainConfig) -> list[dict[str, Any]]:
        trainable = [p for p in self.net.parameters() if p.requires_grad]
        return [{"params": trainable, "lr": cfg.lr, "name": "peft"}]

    def set_phase(self, frozen: bool) -> None:
        self.train()


def augment(image: np.ndarray, label: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Random flips and, for square slices, 90-degree rotations (the same on image and label)."""
    if rng.random() < 0.5:
        image, label = image[:, ::-1], label[:, ::-1]
    if rng.random() < 0.5:
        image, label = image[::-1], label[::-1]
    if image.shape[0] == image.shape[1]:
        k = int(rng.integers(4))
        image, label = np.rot90(image, k), np.rot90(label, k)
    return image, label


class SliceTask:
    """Batches, loss and scores of a 2D segmenter on `Case`s (see the module docstring).

    Args:
        segment: the `segment:` section of `lsmfm finetune segment` (loss weights, threshold).
        metrics: the per-case metrics to report (names of `lsmfm.baselines2d.evaluate.METRICS`).
        batch_size: slices per forward pass when scoring.
    """

    val_metric = "dice"

    def __init__(self, segment: Any, metrics: tuple[str, ...], batch_size: int = 2) -> None:
        from lsmfm.losses.segmentation import SegmentationLoss

        self.cfg, self.metrics, self.batch_size = segment, tuple(metrics), batch_size
        self.loss_fn = SegmentationLoss(dice_weight=segment.dice_weight, bce_weight=segment.bce_weight,
                                        focal=segment.focal, cldice_weight=segment.cldice_weight,
                                        cldice_iters=segment.cldice_iters)

    def batch(self, cases: list[Case], rng: np.random.Generator, size: Any, batch_size: int, flips: bool
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """`batch_size` whole slices of `cases`; every slice of a batch has the first one's shape (a
        batch is one tensor), so the others are drawn among the cases of that slice shape."""
        first = cases[int(rng.integers(len(cases)))]
        alike = [c for c in cases if c.image.shape[1:] == first.image.shape[1:]]
        images, labels = [], []
        for i in range(batch_size):
            case = first if i == 0 else alike[int(rng.integers(len(alike)))]
            image, label = self._draw_slice(case, rng)
            if flips:
                image, label = augment(image, label, rng)
            images.append(np.ascontiguousarray(image))
            labels.append(np.ascontiguousarray(label))
        x = torch.from_numpy(np.stack(images)[:, None].astype(np.float32))
        y = torch.from_numpy(np.stack(labels)[:, None].astype(np.float32))
        return x, y

    def _draw_slice(self, case: Case, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        with_foreground = case.foreground_slices
        if len(with_foreground) and rng.random() < FOREGROUND_SLICES:
            z = int(with_foreground[int(rng.integers(len(with_foreground)))])
        else:
            z = int(rng.integers(case.image.shape[0]))
        return case.image[z], case.label[z] > 0

    def loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.loss_fn(output, target)

    def score(self, model: SliceModel, cases: list[Case], roi: Any = None, overlap: float = 0.0) -> Scores:
        """Mean metrics over `cases`, per-case metrics, and the predicted masks (Z, H, W) uint8."""
        device = next(model.parameters()).device
        per_image, masks = [], []
        for case in cases:
            mask = predict_case(model.net, case, device, self.batch_size, self.cfg.threshold)
            per_image.append({"stem": case.name, **score_case(mask, case, self.metrics)})
            masks.append(mask.astype(np.uint8))
        metrics = {m: float(np.mean([r[m] for r in per_image])) for m in self.metrics}
        return Scores(metrics, per_image, masks)
