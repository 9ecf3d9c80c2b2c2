"""EMA teacher update and the step schedules (pure functions, hand-computed values)."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lsmfm.training import schedules
from lsmfm.training.ema import EmaUpdater


def pair() -> tuple[nn.Module, nn.Module]:
    teacher = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    student = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2), nn.Linear(2, 1))  # extra student head
    with torch.no_grad():
        for p in teacher.parameters():
            p.fill_(1.0)
        for p in student.parameters():
            p.fill_(3.0)
    return teacher, student


def test_update_is_momentum_average_of_every_parameter():
    teacher, student = pair()
    ema = EmaUpdater(teacher, student)
    ema(0.75)
    for p in teacher.parameters():
        assert torch.allclose(p, torch.full_like(p, 0.75 * 1.0 + 0.25 * 3.0))
    ema(1.0)
    assert torch.allclose(teacher[0].weight, torch.full_like(teacher[0].weight, 1.5))


def test_cached_lists_follow_the_parameters_when_their_storage_is_replaced():
    """DeepSpeed ZeRO re-points `param.data` into flat buffers after the model is built."""
    teacher, student = pair()
    ema = EmaUpdater(teacher, student)
    student[0].weight.data = torch.full((2, 3), 5.0)
    teacher[0].weight.data = torch.full((2, 3), 1.0)
    ema(0.5)
    assert torch.equal(teacher[0].weight, torch.full((2, 3), 3.0))


def test_student_in_another_dtype_is_cast():
    teacher, student = pair()
    student.to(torch.float64)
    EmaUpdater(teacher, student)(0.5)
    assert teacher[0].weight.dtype == torch.float32 and torch.allclose(teacher[0].weight, torch.full((2, 3), 2.0))


def test_normalisation_buffers_are_the_teachers_own():
    teacher, student = pair()
    student[1].running_mean.fill_(5.0)
    student[1].running_var.fill_(7.0)
    EmaUpdater(teacher, student)(0.5)
    assert torch.equal(teacher[1].running_mean, torch.zeros(2))
    assert torch.equal(teacher[1].running_var, torch.ones(2))


def test_mismatched_structure_and_bad_momentum_raise():
    teacher, student = pair()
    with pytest.raises(KeyError):
        EmaUpdater(student, teacher)
    with pytest.raises(ValueError):
        EmaUpdater(teacher, student)(1.5)


def test_cosine_momentum_schedule():
    assert schedules.ema_momentum(0, 100) == pytest.approx(0.996)
    assert schedules.ema_momentum(50, 100) == pytest.approx(0.998)
    assert schedules.ema_momentum(100, 100) == 1.0
    assert schedules.ema_momentum(500, 100) == 1.0


def test_warmup_cosine_lr():
    assert schedules.warmup_cosine(0, 110, 1e-3, 10) == 0.0
    assert schedules.warmup_cosine(5, 110, 1e-3, 10) == pytest.approx(5e-4)
    assert schedules.warmup_cosine(10, 110, 1e-3, 10) == pytest.approx(1e-3)
    assert schedules.warmup_cosine(60, 110, 1e-3, 10, final=1e-4) == pytest.approx(1e-4 + 0.9e-3 * 0.5)
    assert schedules.warmup_cosine(110, 110, 1e-3, 10, final=1e-4) == pytest.approx(1e-4)
    mid = schedules.cosine_schedule(25, 100, 1.0, 0.0)
    assert mid == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))


def test_linear_warmups_for_temperature_and_mask_ratio():
    assert schedules.teacher_temperature(0, 10, 0.04, 0.07) == pytest.approx(0.04)
    assert schedules.teacher_temperature(5, 10, 0.04, 0.07) == pytest.approx(0.055)
    assert schedules.teacher_temperature(99, 10, 0.04, 0.07) == pytest.approx(0.07)
    assert schedules.mask_ratio(3, 4, 0.2, 0.6) == pytest.approx(0.5)
    assert schedules.mask_ratio(3, 0, 0.2, 0.6) == pytest.approx(0.6)


def test_step_warmup_of_the_mask_ratio():
    """The paper's schedule: mask_ratio_warmup for the warm-up epochs, then mask_ratio."""
    assert [schedules.mask_ratio(s, 20, 0.05, 0.3, "step") for s in (0, 19, 20, 500)] == [0.05, 0.05, 0.3, 0.3]
