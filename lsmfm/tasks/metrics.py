"""Task metrics: segmentation overlap (Dice, IoU, clDice), restoration (PSNR, 3D SSIM), classification.

Empty-mask convention of the segmentation metrics (tested): when ground truth and prediction are both
empty the score is 1.0 (nothing to find, nothing found); when exactly one of them is empty it is 0.0.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

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


def psnr(pred: np.ndarray, target: np.ndarray, data_range: float) -> float:
    """Peak signal-to-noise ratio in dB, 10 log10(R² / MSE); `inf` for identical inputs (as scikit-image).

    `data_range` R must be fixed by the caller (1.0 on normalised images), never taken from the data, so
    scores of different images and of the blurred baseline are comparable.
    """
    p, t = np.asarray(pred, dtype=np.float64), np.asarray(target, dtype=np.float64)
    if p.shape != t.shape:
        raise ValueError(f"prediction shape {p.shape} differs from target shape {t.shape}")
    if data_range <= 0:
        raise ValueError(f"data_range must be > 0, got {data_range}")
    mse = float(np.mean((p - t) ** 2))
    if mse == 0.0:
        return math.inf
    return 10.0 * math.log10(data_range ** 2 / mse)


def ssim3d(pred: np.ndarray, target: np.ndarray, data_range: float, window_size: int = 11,
           sigma: float = 1.5) -> float:
    """Mean 3D SSIM of two (Z, Y, X) or (C, Z, Y, X) volumes, Gaussian window (see lsmfm.losses.ssim);
    equals scikit-image's with gaussian_weights=True, use_sample_covariance=False."""
    import torch

    from lsmfm.losses.ssim import ssim

    p, t = np.asarray(pred, dtype=np.float64), np.asarray(target, dtype=np.float64)
    if p.shape != t.shape or p.ndim not in (3, 4):
        raise ValueError(f"ssim3d expects two (Z, Y, X) or (C, Z, Y, X) volumes of the same shape, got "
                         f"{p.shape} and {t.shape}")
    if p.ndim == 3:
        p, t = p[None], t[None]
    x, y = torch.from_numpy(p)[None], torch.from_numpy(t)[None]
    return float(ssim(x, y, data_range, window_size, sigma).item())


def confusion_matrix(y_true: Sequence[int], y_pred: Sequence[int], n_classes: int | None = None
                     ) -> np.ndarray:
    """Counts (n_classes, n_classes): row = true class, column = predicted class."""
    t, p = np.asarray(y_true, dtype=np.int64), np.asarray(y_pred, dtype=np.int64)
    if t.shape != p.shape or t.ndim != 1:
        raise ValueError(f"y_true and y_pred must be 1D of the same length, got {t.shape} and {p.shape}")
    n = int(n_classes if n_classes is not None else max(t.max(initial=-1), p.max(initial=-1)) + 1)
    if len(t) and (min(t.min(), p.min()) < 0 or max(t.max(), p.max()) >= n):
        raise ValueError(f"class indices must lie in [0, {n})")
    cm = np.zeros((n, n), dtype=np.int64)
    np.add.at(cm, (t, p), 1)
    return cm


def accuracy(y_true: Sequence[int], y_pred: Sequence[int]) -> float:
    """Fraction of correct predictions."""
    cm = confusion_matrix(y_true, y_pred)
    return float(np.trace(cm) / cm.sum()) if cm.sum() else 0.0


def balanced_accuracy(y_true: Sequence[int], y_pred: Sequence[int]) -> float:
    """Mean recall over the classes present in `y_true` (as scikit-learn): a majority-class guess on
    imbalanced data scores 1/n_classes, not the majority share."""
    cm = confusion_matrix(y_true, y_pred)
    support = cm.sum(axis=1)
    present = support > 0
    if not present.any():
        return 0.0
    return float(np.mean(np.diag(cm)[present] / support[present]))


def macro_f1(y_true: Sequence[int], y_pred: Sequence[int]) -> float:
    """Unweighted mean F1 over the classes that occur in `y_true` or `y_pred` (as scikit-learn)."""
    cm = confusion_matrix(y_true, y_pred)
    tp = np.diag(cm).astype(np.float64)
    true_n, pred_n = cm.sum(axis=1), cm.sum(axis=0)
    seen = (true_n + pred_n) > 0
    if not seen.any():
        return 0.0
    f1 = 2 * tp[seen] / (true_n[seen] + pred_n[seen])
    return float(f1.mean())


def plot_confusion_matrix(cm: np.ndarray, class_names: Sequence[str], path: str | Path,
                          title: str = "") -> Path:
    """Write a PNG of the confusion matrix: colour = row-normalised recall, text = counts."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lsmfm.io.atomic import atomic_path

    cm = np.asarray(cm)
    if cm.ndim != 2 or cm.shape[0] != cm.shape[1] or cm.shape[0] != len(class_names):
        raise ValueError(f"confusion matrix {cm.shape} does not match {len(class_names)} class names")
    rates = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
    n = len(class_names)
    fig, ax = plt.subplots(figsize=(1.2 * n + 2.5, 1.1 * n + 2), dpi=120)
    im = ax.imshow(rates, cmap="Blues", vmin=0.0, vmax=1.0)
    for i in range(n):
        for j in range(n):
            ax.text(j, i, str(int(cm[i, j])), ha="center", va="center",
                    color="white" if rates[i, j] > 0.5 else "black")
    ax.set_xticks(range(n), class_names, rotation=30, ha="right")
    ax.set_yticks(range(n), class_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title or "confusion matrix")
    fig.colorbar(im, ax=ax, fraction=0.046, label="recall")
    fig.tight_layout()
    target = Path(path)
    with atomic_path(target) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return target
