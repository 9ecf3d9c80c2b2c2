"""Task metrics against hand-computed values: clDice from hard skeletons, PSNR, classification metrics,
and the confusion-matrix plot."""
from __future__ import annotations

import math

import numpy as np
import pytest

from lsmfm.metrics.classification import (accuracy, balanced_accuracy, confusion_matrix, macro_f1,
                                          plot_confusion_matrix)
from lsmfm.metrics.restoration import psnr
from lsmfm.metrics.segmentation import cldice_score, dice_score


def line_mask(length: int = 20) -> np.ndarray:
    m = np.zeros((9, 9, length + 4), bool)
    m[4, 4, 2:2 + length] = True
    return m


def test_cldice_empty_conventions():
    empty = np.zeros((6, 6, 6), bool)
    some = empty.copy()
    some[2:4, 2:4, 1:5] = True
    assert cldice_score(empty, empty) == 1.0  # both empty
    assert cldice_score(some, empty) == 0.0  # empty ground truth, non-empty prediction
    assert cldice_score(empty, some) == 0.0  # nothing predicted where there is something
    with pytest.raises(ValueError, match="shape"):
        cldice_score(empty, np.zeros((6, 6, 5), bool))


def test_cldice_of_a_one_voxel_line_with_a_gap():
    # A 1-voxel-wide line is its own skeleton. Removing 4 of 20 voxels: topology precision 1 (every
    # predicted skeleton voxel is in the target), sensitivity 16/20, clDice = 2 * 0.8 / 1.8.
    target = line_mask(20)
    pred = target.copy()
    pred[4, 4, 8:12] = False
    assert cldice_score(pred, target) == pytest.approx(2 * 0.8 / 1.8)
    assert cldice_score(target, target) == 1.0


def test_cldice_ignores_thickness_that_dice_punishes():
    # Predicting a thicker tube around the right centreline keeps clDice at 1 while Dice drops.
    z, y, x = np.indices((15, 15, 30))
    thin = ((z - 7) ** 2 + (y - 7) ** 2 <= 1) & (x >= 3) & (x < 27)
    thick = ((z - 7) ** 2 + (y - 7) ** 2 <= 9) & (x >= 3) & (x < 27)
    assert dice_score(thick, thin) < 0.5
    assert cldice_score(thick, thin) > 0.9


def test_psnr_hand_value_and_identity():
    a = np.zeros((4, 4, 4))
    b = a.copy()
    b[0, 0, 0] = 0.5  # MSE = 0.25 / 64
    assert psnr(b, a, data_range=1.0) == pytest.approx(10 * math.log10(64 / 0.25))
    assert psnr(b * 2, a * 2, data_range=2.0) == pytest.approx(psnr(b, a, data_range=1.0))
    assert psnr(a, a, data_range=1.0) == math.inf
    with pytest.raises(ValueError, match="data_range"):
        psnr(a, b, data_range=0.0)


def test_classification_metrics_hand_computed():
    # 3 classes; true counts 4, 2, 1. Confusion (rows true, cols predicted):
    # [[3, 1, 0], [0, 2, 0], [1, 0, 0]]
    y_true = [0, 0, 0, 0, 1, 1, 2]
    y_pred = [0, 0, 0, 1, 1, 1, 0]
    cm = confusion_matrix(y_true, y_pred, n_classes=3)
    np.testing.assert_array_equal(cm, [[3, 1, 0], [0, 2, 0], [1, 0, 0]])
    assert accuracy(y_true, y_pred) == pytest.approx(5 / 7)
    assert balanced_accuracy(y_true, y_pred) == pytest.approx((3 / 4 + 2 / 2 + 0 / 1) / 3)
    f1 = [2 * 3 / (4 + 4), 2 * 2 / (2 + 3), 0.0]  # 2 tp / (true + predicted) per class
    assert macro_f1(y_true, y_pred) == pytest.approx(sum(f1) / 3)


def test_balanced_accuracy_exposes_a_majority_guess():
    y_true = [0] * 9 + [1]
    y_pred = [0] * 10
    assert accuracy(y_true, y_pred) == pytest.approx(0.9)
    assert balanced_accuracy(y_true, y_pred) == pytest.approx(0.5)
    assert macro_f1(y_true, y_pred) == pytest.approx((2 * 9 / 19 + 0) / 2)
    with pytest.raises(ValueError, match="class indices"):
        confusion_matrix([0, 3], [0, 1], n_classes=2)


def test_confusion_matrix_plot_is_a_png(tmp_path):
    cm = confusion_matrix([0, 1, 2, 2], [0, 2, 2, 1], n_classes=3)
    path = plot_confusion_matrix(cm, ["amyloid_plaque", "cell_nucleus", "vessels"], tmp_path / "cm.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in tmp_path.iterdir()] == ["cm.png"]  # no temporary file left behind
    with pytest.raises(ValueError, match="class names"):
        plot_confusion_matrix(cm, ["a", "b"], tmp_path / "bad.png")
