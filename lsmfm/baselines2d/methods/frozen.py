"""Frozen encoder: only the decoder trains (the reference point of every other method's parameter count)."""

from __future__ import annotations

from lsmfm.baselines2d.config import PeftConfig
from lsmfm.baselines2d.models.base import Segmenter2D


def apply(model: Segmenter2D, cfg: PeftConfig) -> None:
    """Nothing to add: `prepare` has already frozen the encoder and unfrozen the decoder."""
