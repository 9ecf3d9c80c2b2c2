"""Full finetuning: every encoder and decoder parameter trains."""

from __future__ import annotations

from lsmfm.baselines2d.config import PeftConfig
from lsmfm.baselines2d.models.base import Segmenter2D


def apply(model: Segmenter2D, cfg: PeftConfig) -> None:
    model.requires_grad_(True)
