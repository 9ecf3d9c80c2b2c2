"""Segmentation overlap metrics on binary masks, with an explicit empty-mask convention.

Convention (tested): when ground truth and prediction are both empty the score is 1.0 (nothing to find,
nothing found); when exactly one of them is empty the score is 0.0.
"""
from __future__ import annotations

import numpy as np


def _binary(a: np.ndarray) -> np.ndarray:
    return np.asarray(a).astype(bool)


def dice_score(pred: np.ndarray, target: np.ndarray) -> float:
    """Dice = 2|P∩T| / (|P| + |T|) of binary masks; 1.0 when both are empty."""
    p, t = _binary(pred), _binary(target)
    if p.shape != t.shape:
        raise ValueError(f"prediction shape {p.shape} differs from target shape {t.shape}")
    denom = int(p.sum()) + int(t.sum())
    if denom == 0:
        return 1.0
    return 2.0 * int(np.logical_and(p, t).sum()) / denom


def iou_score(pred: np.ndarray, target: np.ndarray) -> float:
    """IoU = |P∩T| / |P∪T| of binary masks; 1.0 when both are empty."""
    p, t = _binary(pred), _binary(target)
    if p.shape != t.shape:
        raise ValueError(f"prediction shape {p.shape} differs from target shape {t.shape}")
    union = int(np.logical_or(p, t).sum())
    if union == 0:
        return 1.0
    return int(np.logical_and(p, t).sum()) / union
