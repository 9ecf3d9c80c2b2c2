"""Training schedules as pure functions of the step, so a resumed run recomputes them exactly.

Nothing here holds state: the checkpoint only needs the step number to continue every schedule.

Example:
    >>> warmup_cosine(0, 100, peak=1e-3, warmup_steps=10)
    0.0
    >>> ema_momentum(100, 100)
    1.0
"""
from __future__ import annotations

import math


def cosine_schedule(step: int, max_steps: int, start: float, end: float) -> float:
    """Half-cosine from `start` at step 0 to `end` at `max_steps` (held at `end` afterwards)."""
    if max_steps <= 0:
        return end
    progress = min(max(step, 0), max_steps) / max_steps
    return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * progress))


def linear_warmup(step: int, warmup_steps: int, start: float, end: float) -> float:
    """Linear ramp from `start` to `end` over `warmup_steps`, then `end`."""
    if warmup_steps <= 0 or step >= warmup_steps:
        return end
    return start + (end - start) * max(step, 0) / warmup_steps


def warmup_cosine(step: int, max_steps: int, peak: float, warmup_steps: int, final: float = 0.0) -> float:
    """Learning rate: linear warm-up from 0 to `peak`, then cosine decay to `final` at `max_steps`."""
    if step < warmup_steps:
        return peak * max(step, 0) / warmup_steps
    return cosine_schedule(step - warmup_steps, max_steps - warmup_steps, peak, final)


def ema_momentum(step: int, max_steps: int, start: float = 0.996, end: float = 1.0) -> float:
    """Teacher EMA momentum, cosine from `start` to `end` (DINO): the teacher settles as training ends."""
    return cosine_schedule(step, max_steps, start, end)


def teacher_temperature(step: int, warmup_steps: int, start: float = 0.04, end: float = 0.07) -> float:
    """Teacher softmax temperature: starts sharp, warms up linearly (DINO), always below the student's."""
    return linear_warmup(step, warmup_steps, start, end)


def step_warmup(step: int, warmup_steps: int, start: float, end: float) -> float:
    """`start` for the first `warmup_steps` steps, then `end`."""
    return start if step < warmup_steps else end


def mask_ratio(step: int, warmup_steps: int, start: float, end: float, kind: str = "linear") -> float:
    """Fraction of voxels masked: easy (low) at first, then the target ratio, by a linear ramp or a step."""
    if kind == "step":
        return step_warmup(step, warmup_steps, start, end)
    return linear_warmup(step, warmup_steps, start, end)
