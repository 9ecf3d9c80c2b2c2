"""Pretraining losses against hand-computed values: reconstruction, distillation (+ centring), CLIP."""
from __future__ import annotations

import math

import pytest
import torch

from lsmfm.losses.clip import ClipLoss, text_ids
from lsmfm.losses.distillation import DistillationLoss, entropy
from lsmfm.losses.reconstruction import MaskedReconstructionLoss
from lsmfm.models.ssl import DistillConfig


# ---- masked reconstruction ------------------------------------------------------------------------
def recon_case() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    pred = torch.zeros(1, 1, 1, 1, 4)
    target = torch.tensor([1.0, -2.0, 3.0, 10.0]).view(1, 1, 1, 1, 4)
    mask = torch.tensor([True, True, True, False]).view(1, 1, 1, 4)
    return pred, target, mask


def test_reconstruction_l1_and_l2_on_masked_voxels_only():
    pred, target, mask = recon_case()
    assert MaskedReconstructionLoss("l1")(pred, target, mask).item() == pytest.approx((1 + 2 + 3) / 3)
    assert MaskedReconstructionLoss("l2")(pred, target, mask).item() == pytest.approx((1 + 4 + 9) / 3)


def test_reconstruction_without_masked_voxels_is_zero_and_differentiable():
    pred = torch.rand(1, 1, 2, 2, 2, requires_grad=True)
    none = torch.zeros(1, 2, 2, 2, dtype=torch.bool)
    loss = MaskedReconstructionLoss("l2")(pred, torch.rand(1, 1, 2, 2, 2), none)
    loss.backward()
    assert loss.item() == 0.0 and torch.all(pred.grad == 0)
    with pytest.raises(ValueError):
        MaskedReconstructionLoss("huber")


# ---- distillation -----------------------------------------------------------------------------------
def test_distillation_cross_entropy_hand_value():
    loss = DistillationLoss(2, student_temp=1.0)
    targets = loss.teacher_targets(torch.tensor([[1.0, 0.0], [0.0, 0.0]]), teacher_temp=0.5)
    q1 = 1 / (1 + math.e ** 2)  # softmax([2, 0])[1]
    assert targets[0, 1].item() == pytest.approx(q1)
    value = loss(torch.tensor([[0.0, 1.0], [0.0, 0.0]]), targets)
    expected = ((math.log(1 + math.e) - q1) + math.log(2)) / 2
    assert value.item() == pytest.approx(expected, rel=1e-6)


def test_centre_is_ema_of_batch_mean_and_is_subtracted():
    loss = DistillationLoss(2, centre_momentum=0.9)
    loss.update_centre(torch.tensor([[1.0, 0.0], [3.0, 2.0]]))
    assert torch.allclose(loss.centre, torch.tensor([[0.2, 0.1]]))
    loss.centre.copy_(torch.tensor([[1.0, 0.0]]))
    targets = loss.teacher_targets(torch.tensor([[1.0, 0.0]]), teacher_temp=0.04)
    assert torch.allclose(targets, torch.tensor([[0.5, 0.5]]))


def test_centring_keeps_a_constant_teacher_from_one_hot_targets():
    """Fault 4: a teacher that always favours prototype 0 must not produce constant one-hot targets."""
    k = 8
    logits = torch.zeros(64, k)
    logits[:, 0] = 1.0  # the largest cosine logit, for every input
    uncentred = DistillationLoss(k)
    centred = DistillationLoss(k, centre_momentum=0.9)
    for _ in range(50):
        no_centre = uncentred.teacher_targets(logits, teacher_temp=0.04)
        with_centre = centred.teacher_targets(logits, teacher_temp=0.04)
        centred.update_centre(logits)
    assert entropy(no_centre).item() < 1e-6  # collapsed: a one-hot constant target
    assert entropy(with_centre).item() > 0.95 * math.log(k)
    assert with_centre.max().item() < 0.2


def test_teacher_must_be_sharper_than_student():
    with pytest.raises(ValueError, match="sharper"):
        DistillConfig(student_temp=0.1, teacher_temp=0.2)
    with pytest.raises(ValueError, match="sharper"):
        DistillConfig(student_temp=0.1, teacher_temp=0.07, teacher_temp_start=0.1)


# ---- CLIP ----------------------------------------------------------------------------------------------
def reference_clip(img: torch.Tensor, txt: torch.Tensor, ids: list[str], temperature: float) -> float:
    """Loop formula: symmetric InfoNCE where same-text off-diagonal pairs are left out of the denominator."""
    img = torch.nn.functional.normalize(img, dim=-1).tolist()
    txt = torch.nn.functional.normalize(txt, dim=-1).tolist()
    n = len(ids)
    sim = [[sum(a * b for a, b in zip(img[i], txt[j])) / temperature for j in range(n)] for i in range(n)]
    total = 0.0
    for i in range(n):
        keep = [j for j in range(n) if j == i or ids[j] != ids[i]]
        total += -sim[i][i] + math.log(sum(math.exp(sim[i][j]) for j in keep))
        total += -sim[i][i] + math.log(sum(math.exp(sim[j][i]) for j in keep))
    return total / (2 * n)


def test_clip_two_pairs_hand_value_and_top1():
    loss = ClipLoss(init_temperature=1.0)
    eye = torch.eye(2)
    out = loss(eye, eye, text_ids(["a", "b"]))
    assert out.loss.item() == pytest.approx(math.log(1 + math.exp(-1.0)))
    assert out.top1 == 1.0 and out.align.item() == pytest.approx(0.0, abs=1e-7)
    swapped = loss(eye, eye.flip(0), text_ids(["a", "b"]))
    assert swapped.align.item() == pytest.approx(1.0) and swapped.top1 == 0.0


def test_clip_identical_texts_are_not_negatives():
    torch.manual_seed(0)
    img, txt = torch.randn(5, 6), torch.randn(5, 6)
    ids = ["a", "b", "a", "c", "b"]
    out = ClipLoss(init_temperature=0.5)(img, txt, text_ids(ids))
    assert out.loss.item() == pytest.approx(reference_clip(img, txt, ids, 0.5), rel=1e-5)
    same = ClipLoss()(img, txt, text_ids(["x"] * 5))
    assert same.loss.item() == pytest.approx(0.0, abs=1e-6)


def test_clip_temperature_is_learnable_and_clamped():
    loss = ClipLoss(init_temperature=0.07, max_logit_scale=100.0)
    out = loss(torch.randn(4, 3), torch.randn(4, 3), text_ids(list("abcd")))
    out.loss.backward()
    assert loss.logit_scale.grad is not None and loss.logit_scale.grad.abs() > 0
    with torch.no_grad():
        loss.logit_scale.fill_(math.log(1000.0))
    assert loss.temperature == pytest.approx(0.01)
    assert text_ids(["same"]).item() == text_ids(["same"]).item() != text_ids(["other"]).item()
