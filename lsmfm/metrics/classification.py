"""Classification metrics on class indices: accuracy, balanced accuracy, macro-F1, the confusion matrix
and its plot."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np


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
