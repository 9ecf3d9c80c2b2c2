"""Soft-clDice and the segmentation loss: hand-computed skeletons and losses, and a vessel tree whose thin
branch is broken in two places (topology lost, volume nearly intact)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from monai.losses import DiceLoss, FocalLoss

from lsmfm.losses.cldice import SoftClDiceLoss, soft_skeleton
from lsmfm.losses.segmentation import SegmentationLoss
from lsmfm.metrics.segmentation import cldice_score, dice_score



def t5(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.asarray(a, dtype=np.float32))[None, None]


def bar() -> np.ndarray:
    """A 3x3x5 solid bar (z 1-3, y 1-3, x 1-5) in a 5x5x7 volume."""
    m = np.zeros((5, 5, 7), np.float32)
    m[1:4, 1:4, 1:6] = 1
    return m


def vessel_tree(shape: tuple[int, int, int] = (32, 32, 48)) -> tuple[np.ndarray, np.ndarray]:
    """A thick vessel (radius 4) and a thin one (cross-shaped 1-voxel section), and the thin one's mask."""
    z, y, x = np.indices(shape)
    inside = (x >= 4) & (x < shape[2] - 4)
    thick = ((z - 10) ** 2 + (y - 10) ** 2 <= 16) & inside
    thin = (abs(z - 22) + abs(y - 22) <= 1) & inside
    return thick | thin, thin


def broken_tree() -> tuple[np.ndarray, np.ndarray]:
    """(intact tree, the same tree with its thin vessel cut at two places, 3 voxels each)."""
    tree, thin = vessel_tree()
    x = np.indices(tree.shape)[2]
    broken = tree.copy()
    broken[thin & (((x >= 15) & (x < 18)) | ((x >= 30) & (x < 33)))] = False
    return tree, broken


def test_soft_skeleton_of_a_bar_is_its_centre_line():
    # Opening the bar gives the bar back (nothing added); its 6-neighbour erosion is the 3-voxel centre line
    # (z=2, y=2, x=2..4), which an opening removes entirely, so the skeleton is that line.
    skel = soft_skeleton(t5(bar()), iterations=3)[0, 0].numpy()
    expected = np.zeros_like(bar())
    expected[2, 2, 2:5] = 1
    np.testing.assert_array_equal(skel, expected)


def test_soft_cldice_matches_hand_computed_value():
    # Target: the bar (skeleton = 3-voxel line). Prediction: the bar with its middle slab x=3 removed, two
    # 3x3x2 pieces that erode to nothing, so the prediction is its own skeleton (18 voxels).
    # tprec = (|S(P)∩T| + 1) / (|S(P)| + 1) = 19 / 19 = 1; tsens = (|S(T)∩P| + 1) / (|S(T)| + 1) = 3 / 4.
    pred = bar()
    pred[:, :, 3] = 0
    loss = SoftClDiceLoss(iterations=3, smooth=1.0, from_logits=False)(t5(pred), t5(bar()))
    expected = 1 - 2 * 1.0 * 0.75 / (1.0 + 0.75 + 1e-4)
    assert loss.item() == pytest.approx(expected, abs=1e-6)


def test_broken_thin_vessel_lowers_cldice_but_barely_dice():
    tree, broken = broken_tree()
    assert dice_score(tree, tree) == 1.0 and cldice_score(tree, tree) == 1.0
    dice_drop = 1 - dice_score(broken, tree)
    cldice_drop = 1 - cldice_score(broken, tree)
    assert dice_drop < 0.01  # 30 of 2160 voxels lost
    assert cldice_drop > 0.03  # 6 of ~73 centreline voxels lost
    assert cldice_drop > 4 * dice_drop
    soft = SoftClDiceLoss(iterations=5, from_logits=False)
    intact_loss, broken_loss = soft(t5(tree), t5(tree)).item(), soft(t5(broken), t5(tree)).item()
    assert intact_loss < 1e-3
    assert broken_loss > intact_loss + 0.03


def test_soft_cldice_empty_target_conventions():
    soft = SoftClDiceLoss(iterations=3, from_logits=False)
    empty = np.zeros((8, 8, 8), np.float32)
    some = empty.copy()
    some[3:5, 3:5, 2:7] = 1
    assert soft(t5(empty), t5(empty)).item() < 1e-3  # nothing to find, nothing found
    assert soft(t5(some), t5(empty)).item() > 0.5  # foreground predicted where there is none


def test_segmentation_loss_is_the_weighted_sum_of_its_terms():
    torch.manual_seed(0)
    logits = torch.randn(2, 1, 16, 16, 16)
    target = (torch.rand(2, 1, 16, 16, 16) > 0.8).float()
    loss = SegmentationLoss(dice_weight=0.7, bce_weight=2.0, cldice_weight=0.3, cldice_iters=2)
    terms = loss.terms(logits, target)
    assert set(terms) == {"dice", "bce", "cldice"}
    assert terms["dice"].item() == pytest.approx(DiceLoss(sigmoid=True, batch=True)(logits, target).item())
    assert terms["bce"].item() == pytest.approx(F.binary_cross_entropy_with_logits(logits, target).item())
    assert terms["cldice"].item() == pytest.approx(SoftClDiceLoss(2)(logits, target).item())
    expected = 0.7 * terms["dice"] + 2.0 * terms["bce"] + 0.3 * terms["cldice"]
    assert loss(logits, target).item() == pytest.approx(expected.item(), rel=1e-6)


def test_segmentation_loss_focal_and_zero_weights():
    torch.manual_seed(1)
    logits = torch.randn(1, 1, 12, 12, 12, requires_grad=True)
    target = (torch.rand(1, 1, 12, 12, 12) > 0.7).float()
    loss = SegmentationLoss(dice_weight=0.0, bce_weight=1.0, focal=True, focal_gamma=2.0, cldice_weight=0.0)
    assert set(loss.terms(logits, target)) == {"focal"}
    value = loss(logits, target)
    assert value.item() == pytest.approx(FocalLoss(gamma=2.0)(logits, target).item(), rel=1e-6)
    bce = F.binary_cross_entropy_with_logits(logits, target).item()
    assert value.item() < bce  # easy voxels down-weighted
    value.backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="weights"):
        SegmentationLoss(dice_weight=0.0, bce_weight=0.0, cldice_weight=0.0)


def test_2d_soft_skeleton_and_loss_for_the_2d_arms():
    # A 3x5 rectangle: its 4-neighbour erosion is the 1x3 centre row, which an opening removes, so the 2D
    # skeleton is that row; the 2D loss (B, 1, H, W) is the same weighted sum as in 3D.
    rect = np.zeros((5, 7), np.float32)
    rect[1:4, 1:6] = 1
    skel = soft_skeleton(torch.from_numpy(rect)[None, None], iterations=2)[0, 0].numpy()
    expected = np.zeros_like(rect)
    expected[2, 2:5] = 1
    np.testing.assert_array_equal(skel, expected)
    torch.manual_seed(2)
    logits = torch.randn(3, 1, 16, 16)
    target = (torch.rand(3, 1, 16, 16) > 0.8).float()
    loss = SegmentationLoss(dice_weight=1.0, bce_weight=1.0, cldice_weight=0.5, cldice_iters=2)
    terms = loss.terms(logits, target)
    assert terms["cldice"].item() == pytest.approx(SoftClDiceLoss(2)(logits, target).item())
    assert loss(logits, target).item() == pytest.approx(
        (terms["dice"] + terms["bce"] + 0.5 * terms["cldice"]).item(), rel=1e-6)
    with pytest.raises(ValueError, match="same"):
        loss(logits[:, :, None], target)
