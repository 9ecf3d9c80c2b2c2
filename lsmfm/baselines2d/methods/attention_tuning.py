"""Attention tuning: all weights of every encoder attention module train (projections, relative positions)."""

from __future__ import annotations

from lsmfm.baselines2d.config import PeftConfig
from lsmfm.baselines2d.methods.common import get_part, unfreeze
from lsmfm.baselines2d.models.base import Segmenter2D


def apply(model: Segmenter2D, cfg: PeftConfig) -> None:
    unfreeze(get_part(layer, model.layout.attention) for layer in model.layers)
