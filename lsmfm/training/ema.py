"""Exponential moving average of the student's weights into the teacher.

Call it once per optimizer step (never per micro-batch under gradient accumulation: the student only
changes at an optimizer step, so extra calls would just shrink the momentum).

Normalisation buffers (BatchNorm running mean/var) are deliberately NOT averaged or copied: the teacher
runs in the same train/eval mode as the student, sees the full (unmasked) patches and keeps its own running
statistics of them. The student's statistics describe masked inputs (a large part filled with the mask
token); copying or averaging them into the teacher would normalise full patches with the wrong moments.
"""
from __future__ import annotations

import torch
from torch import nn


def ema_pairs(teacher: nn.Module, student: nn.Module) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Matching (teacher, student) parameter lists, paired by name; the student may hold extra heads."""
    student_params = dict(student.named_parameters())
    t_list, s_list = [], []
    for name, t in teacher.named_parameters():
        if name not in student_params:
            raise KeyError(f"teacher parameter {name!r} has no student counterpart")
        s = student_params[name]
        if s.shape != t.shape:
            raise ValueError(f"{name}: teacher shape {tuple(t.shape)} != student shape {tuple(s.shape)}")
        t_list.append(t)
        s_list.append(s)
    return t_list, s_list


@torch.no_grad()
def update_ema(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """teacher = momentum * teacher + (1 - momentum) * student, with two fused foreach ops.

    Args:
        teacher: module whose parameters are overwritten in place (keep it in fp32: a 0.4 % step is
            below bf16 resolution).
        student: module holding at least every parameter name of `teacher`.
        momentum: in [0, 1]; 1 leaves the teacher unchanged.
    """
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"EMA momentum must be in [0, 1], got {momentum}")
    t_list, s_list = ema_pairs(teacher, student)
    s_list = [s.detach().to(t.dtype) for s, t in zip(s_list, t_list)]
    torch._foreach_mul_(t_list, momentum)
    torch._foreach_add_(t_list, s_list, alpha=1.0 - momentum)
