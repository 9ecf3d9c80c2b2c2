"""iBOT/DINO-style self-distillation over K prototypes, with teacher centring and sharpening.

The student sees the masked patch, the teacher the full one; both are projected onto K prototypes.
Two mechanisms keep the representation from collapsing (both missing from the paper's code):
- centring: an EMA of the teacher's mean logits (all-reduced across ranks) is subtracted before the
  softmax, so no single prototype can dominate for every input. As in dinov2's `iBOTPatchLoss`
  (`reduce_center_update` / `apply_center_update`), the all-reduce is started without waiting and the
  update is applied when the centre is next needed (the next targets, or `state_dict`), so the
  reduction overlaps the backward pass and no step waits on the host for it;
- sharpening: the teacher's temperature is below the student's, so its targets stay confident instead
  of drifting to the uniform distribution.

Use one instance per target (dense voxels, global embedding): each keeps its own centre.

Example:
    >>> loss = DistillationLoss(n_prototypes=4, student_temp=0.1)
    >>> t = loss.teacher_targets(torch.randn(8, 4), teacher_temp=0.05)
    >>> value = loss(torch.randn(8, 4), t); loss.update_centre(torch.randn(8, 4))
"""
from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


class DistillationLoss(nn.Module):
    """Cross-entropy between centred, sharpened teacher targets and student predictions.

    Args:
        n_prototypes: K, the number of logits per row.
        student_temp: softmax temperature of the student (the teacher's must be lower).
        centre_momentum: EMA momentum of the centre (DINO: 0.9).
    """

    centre: torch.Tensor
    _pending: tuple[torch.Tensor, Any] | None

    def __init__(self, n_prototypes: int, student_temp: float = 0.1, centre_momentum: float = 0.9) -> None:
        super().__init__()
        if n_prototypes < 2:
            raise ValueError(f"n_prototypes must be >= 2, got {n_prototypes}")
        if not 0.0 <= centre_momentum < 1.0:
            raise ValueError(f"centre_momentum must be in [0, 1), got {centre_momentum}")
        self.student_temp = student_temp
        self.centre_momentum = centre_momentum
        self.register_buffer("centre", torch.zeros(1, n_prototypes))
        self._pending = None
        self.register_state_dict_pre_hook(lambda module, prefix, keep_vars: module.apply_pending())
        self.register_load_state_dict_pre_hook(lambda module, *args: module.apply_pending())

    @torch.no_grad()
    def teacher_targets(self, teacher_logits: torch.Tensor, teacher_temp: float) -> torch.Tensor:
        """softmax((teacher_logits - centre) / teacher_temp), rows of (N, K), no gradient."""
        self.apply_pending()
        return F.softmax((teacher_logits.float() - self.centre) / teacher_temp, dim=-1)

    def forward(self, student_logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean over rows of -sum_k targets * log_softmax(student_logits / student_temp); 0 for no rows."""
        if student_logits.shape != targets.shape:
            raise ValueError(f"student {tuple(student_logits.shape)} and targets {tuple(targets.shape)} "
                             "differ")
        if student_logits.shape[0] == 0:
            return student_logits.sum() * 0.0
        log_p = F.log_softmax(student_logits.float() / self.student_temp, dim=-1)
        return -(targets * log_p).sum(dim=-1).mean()

    @torch.no_grad()
    def update_centre(self, teacher_logits: torch.Tensor) -> None:
        """centre <- m * centre + (1 - m) * mean of the teacher logits over all rows of all ranks.

        Across ranks the sums and row counts are all-reduced in the background; the update lands at the
        next `teacher_targets`, `apply_pending` or `state_dict`. No rows on any rank: no update.
        """
        self.apply_pending()
        count = torch.full((1, 1), float(teacher_logits.shape[0]), device=teacher_logits.device)
        stats = torch.cat([teacher_logits.float().sum(dim=0, keepdim=True), count], dim=1)
        work = None
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            work = dist.all_reduce(stats, async_op=True)
        self._pending = (stats, work)
        if work is None:
            self.apply_pending()

    @torch.no_grad()
    def apply_pending(self) -> None:
        """Wait for a started centre update and apply it (a no-op when none is pending)."""
        if self._pending is None:
            return
        stats, work = self._pending
        self._pending = None
        if work is not None:
            work.wait()
        total, count = stats[:, :-1], stats[0, -1:]
        updated = self.centre.mul(self.centre_momentum).add(total / count.clamp(min=1.0),
                                                             alpha=1.0 - self.centre_momentum)
        self.centre.copy_(torch.where(count > 0, updated, self.centre))


def entropy(probs: torch.Tensor) -> torch.Tensor:
    """Mean Shannon entropy (nats) of the rows of a probability matrix: 0 = one-hot, log K = uniform."""
    return -(probs * probs.clamp(min=1e-12).log()).sum(dim=-1).mean()
