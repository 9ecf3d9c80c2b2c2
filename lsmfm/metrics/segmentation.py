"""Segmentation overlap of binary masks: Dice, IoU and clDice (topology, from hard skeletons).

Empty-mask convention of the segmentation metrics (tested): when ground truth and prediction are both
empty the score is 1.0 (nothing to find, nothing found); when exactly one of them is empty it is 0.0.
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


def _skeleton(mask: np.ndarray) -> np.ndarray:
    """Hard skeleton (Lee's 3D thinning); the mask itself when thinning leaves nothing (never for a
    non-empty mask in practice, but a skeleton must not vanish while the mask is there)."""
    from skimage.morphology import skeletonize

    skel = skeletonize(mask).astype(bool)
    return skel if skel.any() else mask


def cldice_score(pred: np.ndarray, target: np.ndarray) -> float:
    """clDice (Shit et al. 2021) of binary masks from hard skeletons: the harmonic mean of topology
    precision |S(P)∩T|/|S(P)| and topology sensitivity |S(T)∩P|/|S(T)|. A break in a thin vessel costs
    its share of centreline length, not its (tiny) share of volume. Same empty convention as Dice."""
    p, t = _binary(pred), _binary(target)
    if p.shape != t.shape:
        raise ValueError(f"prediction shape {p.shape} differs from target shape {t.shape}")
    if not p.any() or not t.any():
        return 1.0 if not p.any() and not t.any() else 0.0
    sp, st = _skeleton(p), _skeleton(t)
    tprec = float(np.logical_and(sp, t).sum()) / float(sp.sum())
    tsens = float(np.logical_and(st, p).sum()) / float(st.sum())
    if tprec + tsens == 0:
        return 0.0
    return 2.0 * tprec * tsens / (tprec + tsens)
