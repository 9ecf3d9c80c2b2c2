"""Patch classification from pooled encoder features: class-balanced cross-entropy; accuracy, balanced
accuracy, macro-F1 and a confusion matrix.

The class of a patch is the first group of `classify.class_pattern` in its file name (the sample data:
the structure name before `_patch_`). Classes are those of the training folder; `shots` counts patches
per class, drawn per class with the run's seed (`classify.per_class: false`: patches in all, drawn from
the whole training set, so classes can be unbalanced; the loss weights each class by its inverse
frequency in the run's training patches). A whole val/test image is classified by averaging the
logits of sliding windows of the training patch size.
"""
from __future__ import annotations

import csv
import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping

import numpy as np
import torch
from torch import nn

from lsmfm.data.normalize import NormalizeConfig, normalize_channels
from lsmfm.errors import InputError
from lsmfm.io.atomic import atomic_write_text
from lsmfm.tasks.base import Example, FinetuneTask, Scores, window_starts
from lsmfm.tasks.config import DataConfig, FinetuneConfig
from lsmfm.tasks.data import Patch, load_split


@dataclass
class ClassifyConfig:
    """Patch classification.

    Args:
        class_pattern: regular expression on the file name whose first group is the class
            (the sample data: the structure name before `_patch_`).
        class_field: catalog field holding the class (with data.catalog) instead of the pattern.
        per_class: `shots` counts patches per class (N-way K-shot); false: patches in all.
        head: "linear" or "mlp" on the pooled encoder features.
        balanced: weight the cross-entropy of each class by its inverse frequency in the training patches.
    """

    class_pattern: str = r"^(.+?)_patch_"
    class_field: str = "class_label"
    per_class: bool = True
    head: Literal["linear", "mlp"] = "linear"
    hidden: int = 128
    balanced: bool = True

    def __post_init__(self) -> None:
        if self.hidden < 1:
            raise ValueError(f"classify.hidden must be >= 1, got {self.hidden}")


@dataclass
class ClassifyFinetuneConfig(FinetuneConfig):
    classify: ClassifyConfig = field(default_factory=ClassifyConfig)


@dataclass
class ClassifyHeadConfig:
    """A linear layer or an MLP (one hidden layer, GELU) on the pooled features.

    Args:
        kind: "linear" or "mlp".
        n_classes: number of classes.
        hidden: width of the MLP's hidden layer.
        dropout: dropout before the last layer.
    """

    kind: Literal["linear", "mlp"] = "linear"
    n_classes: int = 2
    hidden: int = 128
    dropout: float = 0.0

    def __post_init__(self) -> None:
        if self.hidden < 1 or self.n_classes < 2:
            raise ValueError(f"head needs hidden >= 1 and n_classes >= 2, got {self}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"head dropout must be in [0, 1), got {self.dropout}")


class ClassifyTask(FinetuneTask):
    name = "classify"
    summary = "patch classification (class-balanced cross-entropy)"
    config_class = ClassifyFinetuneConfig
    head_class = ClassifyHeadConfig
    metrics = ("accuracy", "balanced_accuracy", "macro_f1")
    val_metric = "balanced_accuracy"

    def __init__(self, cfg: ClassifyConfig) -> None:
        super().__init__(cfg)
        self.classes: list[str] = []
        self.class_weights = torch.ones(0)

    def load_split(self, data: DataConfig, split: str) -> list[Patch]:
        if data.catalog:
            return load_split(data, split, class_field=self.cfg.class_field)
        return load_split(data, split, class_pattern=self.cfg.class_pattern)

    def setup(self, train: list[Patch], others: list[Patch]) -> None:
        """Classes are those of the training set; a val/test patch of another class is an error."""
        self.classes = sorted({p.class_name for p in train if p.class_name})
        if len(self.classes) < 2:
            raise InputError(train[0].path.parent if train else None,
                             f"classification needs at least 2 classes in the training set, found "
                             f"{self.classes}")
        for p in others:
            if p.class_name not in self.classes:
                raise InputError(p.path, f"class {p.class_name!r} does not occur in the training set "
                                         f"(classes: {', '.join(self.classes)})")

    def subset(self, patches: list[Patch], shots: int, seed: int, source: str) -> list[int]:
        """`shots` patches of every class, each class drawn with `seed` (or of all, without `per_class`)."""
        from lsmfm.tasks.results import fewshot_subset

        if not self.cfg.per_class:
            return super().subset(patches, shots, seed, source)
        chosen = []
        for name in self.classes:
            members = [i for i, p in enumerate(patches) if p.class_name == name]
            picked = fewshot_subset(len(members), shots, seed, f"{source} (class {name})")
            chosen += [members[i] for i in picked]
        return sorted(chosen)

    def begin_run(self, train: list[Example]) -> None:
        """Class weights inverse to the class frequencies of this run's training patches."""
        counts = np.bincount([int(ex.target) for ex in train], minlength=len(self.classes)).astype(np.float64)
        weights = np.where(counts > 0, counts.sum() / (len(self.classes) * np.maximum(counts, 1)), 0.0)
        self.class_weights = torch.tensor(weights if self.cfg.balanced else np.ones_like(weights),
                                          dtype=torch.float32)

    @classmethod
    def build_head(cls, feature_dim: int, in_channels: int, head: ClassifyHeadConfig) -> nn.Module:
        if head.kind == "linear":
            return nn.Sequential(nn.Dropout(head.dropout), nn.Linear(feature_dim, head.n_classes))
        return nn.Sequential(nn.Linear(feature_dim, head.hidden), nn.GELU(), nn.Dropout(head.dropout),
                             nn.Linear(head.hidden, head.n_classes))

    @classmethod
    def forward(cls, backbone: nn.Module, head: nn.Module, head_cfg: ClassifyHeadConfig, x: torch.Tensor
                ) -> torch.Tensor:
        """Class logits (B, n_classes) from the pooled embedding (`backbone.embed`)."""
        return head(backbone.embed(x))

    @classmethod
    def card_lines(cls, task: Mapping[str, Any]) -> list[str]:
        return [f"Classes (logit order): {', '.join(task['classes'])}"]

    def head_config(self) -> ClassifyHeadConfig:
        return ClassifyHeadConfig(kind=self.cfg.head, n_classes=len(self.classes), hidden=self.cfg.hidden)

    def model_fields(self) -> dict[str, Any]:
        return {"class_names": self.classes}

    def prepare(self, patch: Patch, normalize: NormalizeConfig) -> Example:
        target = self.classes.index(str(patch.class_name))
        return Example(patch, normalize_channels(patch.image, normalize), target)

    def loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(output, target, weight=self.class_weights.to(output.device))

    def score(self, model: nn.Module, examples: list[Example], roi: tuple[int, int, int], overlap: float
              ) -> Scores:
        from lsmfm.metrics.classification import accuracy, balanced_accuracy, macro_f1

        probs = np.stack([window_logits(model, ex.input, roi, overlap).softmax(0).numpy() for ex in examples])
        truth = np.array([int(ex.target) for ex in examples])
        pred = probs.argmax(1)
        metrics = {"accuracy": accuracy(truth, pred), "balanced_accuracy": balanced_accuracy(truth, pred),
                   "macro_f1": macro_f1(truth, pred)}
        per_image = [{"stem": ex.patch.stem, "true": self.classes[t], "predicted": self.classes[p],
                      **{f"p_{c}": float(v) for c, v in zip(self.classes, pr)}}
                     for ex, t, p, pr in zip(examples, truth, pred, probs)]
        return Scores({m: float(v) for m, v in metrics.items()}, per_image, [truth, pred])

    def write_predictions(self, scores: Scores, examples: list[Example], out_dir: Path, fmt: str) -> None:
        """predictions.csv (true and predicted class, probabilities) and confusion_matrix.png."""
        from lsmfm.metrics.classification import confusion_matrix, plot_confusion_matrix

        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=list(scores.per_image[0]))
        writer.writeheader()
        writer.writerows(scores.per_image)
        atomic_write_text(out_dir / "predictions.csv", buf.getvalue())
        truth, pred = scores.predictions
        matrix = confusion_matrix(truth, pred, len(self.classes))
        plot_confusion_matrix(matrix, self.classes, out_dir / "confusion_matrix.png")


@torch.no_grad()
def window_logits(model: nn.Module, image: np.ndarray, roi: tuple[int, int, int], overlap: float
                  ) -> torch.Tensor:
    """Class logits of a whole (C, Z, Y, X) image: the mean over a grid of `roi` windows (zero-padded up
    to `roi` when the image is smaller)."""
    pad = [(0, 0)] + [(0, max(0, r - s)) for r, s in zip(roi, image.shape[1:])]
    image = np.pad(image, pad) if any(p[1] for p in pad) else image
    starts = [window_starts(s, r, overlap) for s, r in zip(image.shape[1:], roi)]
    device = next(model.parameters()).device
    logits = []
    for z in starts[0]:
        for y in starts[1]:
            for x in starts[2]:
                crop = image[:, z:z + roi[0], y:y + roi[1], x:x + roi[2]]
                logits.append(model(torch.from_numpy(np.ascontiguousarray(crop))[None].to(device))[0].float().cpu())
    return torch.stack(logits).mean(0)
