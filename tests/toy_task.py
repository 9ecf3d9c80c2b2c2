"""A toy finetuning task: everything a task owns, in one module (registered by one line in
tests/test_structure.py). It learns to invert normalised intensities (target 1 - x), scored by the
negative L1 error, and writes dense predictions, so `lsmfm predict` runs it too."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from torch import nn

from lsmfm.data.normalize import NormalizeConfig, normalize_channels
from lsmfm.tasks.base import Example, FinetuneTask, Scores, sliding_window
from lsmfm.tasks.config import DataConfig, FinetuneConfig
from lsmfm.tasks.data import Patch, load_split
from lsmfm.tasks.outputs import write_prediction


@dataclass
class InvertConfig:
    l1_weight: float = 1.0


@dataclass
class InvertFinetuneConfig(FinetuneConfig):
    toy: InvertConfig = field(default_factory=InvertConfig)


@dataclass
class InvertHeadConfig:
    bias: bool = True


class InvertTask(FinetuneTask):
    name = "toy"
    summary = "toy task: invert normalised intensities"
    config_class = InvertFinetuneConfig
    head_class = InvertHeadConfig
    metrics = ("neg_l1",)
    val_metric = "neg_l1"
    volume_output = "image"

    @classmethod
    def build_head(cls, feature_dim: int, in_channels: int, head: InvertHeadConfig) -> nn.Module:
        return nn.Conv3d(feature_dim, in_channels, kernel_size=1, bias=head.bias)

    @classmethod
    def card_lines(cls, task: Mapping[str, Any]) -> list[str]:
        return ["Toy task: inverts normalised intensities."]

    def load_split(self, data: DataConfig, split: str) -> list[Patch]:
        return load_split(data, split)

    def head_config(self) -> InvertHeadConfig:
        return InvertHeadConfig()

    def prepare(self, patch: Patch, normalize: NormalizeConfig) -> Example:
        x = normalize_channels(patch.image, normalize)
        return Example(patch, x, 1.0 - x)

    def loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.cfg.l1_weight * nn.functional.l1_loss(output, target)

    def score(self, model: nn.Module, examples: list[Example], roi: tuple[int, int, int], overlap: float
              ) -> Scores:
        outputs = [sliding_window(model, ex.input, roi, overlap).numpy() for ex in examples]
        per_image = [{"stem": ex.patch.stem, "neg_l1": -float(np.abs(out - ex.target).mean())}
                     for ex, out in zip(examples, outputs)]
        return Scores({"neg_l1": float(np.mean([r["neg_l1"] for r in per_image]))}, per_image, outputs)

    def write_predictions(self, scores: Scores, examples: list[Example], out_dir: Path, fmt: str) -> None:
        for out, ex in zip(scores.predictions, examples):
            write_prediction(out[0], ex.patch, out_dir, "inverted", fmt)
