"""Instance segmentation accuracy as in StarDist and the 2018 Data Science Bowl.

For each IoU threshold t in 0.5, 0.55, ..., 0.95, ground-truth and predicted objects are matched
one-to-one (a maximum matching among pairs with IoU >= t), and accuracy(t) = TP / (TP + FP + FN). The
score is the mean over thresholds. Objects are the label's instance ids; a binary mask (one foreground
value) is split into connected components first, so binary labels and predictions are scored the same way.
Convention: no objects in either image gives 1.0.
"""

from __future__ import annotations

import numpy as np

THRESHOLDS = tuple(np.round(np.arange(0.5, 0.96, 0.05), 2))


def instances(label: np.ndarray) -> np.ndarray:
    """Instance ids: the label itself when it holds several ids, else connected components of label > 0."""
    from scipy import ndimage

    label = np.asarray(label)
    if len(np.unique(label[label > 0])) > 1:
        return label.astype(np.int64)
    components, _ = ndimage.label(label > 0)
    return components.astype(np.int64)


def iou_matrix(gt: np.ndarray, pred: np.ndarray) -> tuple[np.ndarray, int, int]:
    """IoU between each ground-truth object and each predicted object that overlaps any of them.

    Returns (iou (n_gt, n_overlapping_pred), n_gt, n_pred); predictions that overlap nothing cannot match.
    """
    gt_ids, g = np.unique(gt, return_inverse=True)
    pred_ids, p = np.unique(pred, return_inverse=True)
    g, p = g.ravel(), p.ravel()
    gt_area, pred_area = np.bincount(g), np.bincount(p)
    both = (gt.ravel() > 0) & (pred.ravel() > 0)
    codes, inter = np.unique(g[both] * len(pred_ids) + p[both], return_counts=True)
    pg, pp = np.divmod(codes, len(pred_ids))
    g_fg = np.flatnonzero(gt_ids > 0)
    p_fg = np.unique(pp)
    row_of = np.zeros(len(gt_ids), dtype=np.int64)
    row_of[g_fg] = np.arange(len(g_fg))
    col_of = np.zeros(len(pred_ids), dtype=np.int64)
    col_of[p_fg] = np.arange(len(p_fg))
    iou = np.zeros((len(g_fg), len(p_fg)))
    iou[row_of[pg], col_of[pp]] = inter / (gt_area[pg] + pred_area[pp] - inter)
    return iou, len(g_fg), int((pred_ids > 0).sum())


def matched(iou: np.ndarray, threshold: float) -> int:
    """Size of a maximum one-to-one matching among pairs with IoU >= threshold."""
    from scipy.optimize import linear_sum_assignment

    valid = iou >= threshold
    if not valid.any():
        return 0
    rows, cols = linear_sum_assignment(valid, maximize=True)
    return int(valid[rows, cols].sum())


def accuracy_per_threshold(
    pred: np.ndarray, target: np.ndarray, thresholds: tuple[float, ...] = THRESHOLDS
) -> dict[float, float]:
    """accuracy(t) = TP / (TP + FP + FN) for each threshold t."""
    p, t = instances(pred), instances(target)
    if p.shape != t.shape:
        raise ValueError(f"prediction shape {p.shape} differs from target shape {t.shape}")
    iou, n_gt, n_pred = iou_matrix(t, p)
    out = {}
    for thr in thresholds:
        tp = matched(iou, thr)
        denom = n_gt + n_pred - tp
        out[float(thr)] = 1.0 if denom == 0 else tp / denom
    return out


def mean_segmentation_accuracy(pred: np.ndarray, target: np.ndarray) -> float:
    """Mean of accuracy(t) over IoU thresholds 0.5:0.05:0.95 (the DSB 2018 / StarDist score)."""
    return float(np.mean(list(accuracy_per_threshold(pred, target).values())))
