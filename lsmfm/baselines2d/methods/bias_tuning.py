"""Bias tuning (BitFit): the biases of the encoder's transformer layers train."""

from __future__ import annotations

from lsmfm.baselines2d.config import PeftConfig
from lsmfm.baselines2d.methods.common import unfreeze
from lsmfm.baselines2d.models.base import Segmenter2D


def apply(model: Segmenter2D, cfg: PeftConfig) -> None:
    unfreeze(model.layers, only_bias=True)
