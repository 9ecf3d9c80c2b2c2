"""LayerNorm tuning: the two LayerNorms (scale and shift) of every encoder layer train."""

from __future__ import annotations

from lsmfm.baselines2d.config import PeftConfig
from lsmfm.baselines2d.methods.common import get_part, unfreeze
from lsmfm.baselines2d.models.base import Segmenter2D


def apply(model: Segmenter2D, cfg: PeftConfig) -> None:
    unfreeze(get_part(layer, path) for layer in model.layers for path in model.layout.norms)
