"""iBOT/DINO-style self-distillation over K prototypes, with teacher centring and sharpening.

The student sees the masked patch, the teacher the full one; both are projected onto K prototypes.
Two mechanisms keep the representation from collapsing (both missing from the paper's code):
- centring: an EMA of the teacher's mean logits (all-reduced across ranks) is subtracted before the
  softmax, so no single prototype can dominate for every input;
- sharpening: the teacher's temperature is below the student's, so its targets stay confident instead
  of drifting to the uniform distribution.

Use one instance per target (dense voxels, global embedding): each keeps its own centre.

Example:
    >>> loss = DistillationLoss(n_prototypes=4, student_temp=0.1)
    >>> t = loss.teacher_targets(torch.randn(8, 4), teacher_temp=0.05)
    >>> value = loss(torch.randn(8, 4), t); loss.update_centre(torch.randn(8, 4))
"""
from __future__ import annotations

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

    def __init__(self, n_prototypes: int, student_temp: float = 0.1, centre_momentum: float = 0.9) -> None:
        super().__init__()
        if n_prototypes < 2:
            raise ValueError(f"n_prototypes must be >= 2, got {n_prototypes}")
        if not 0.0 <= centre_momentum < 1.0:
            raise ValueError(f"centre_momentum must be in [0, 1), got {centre_momentum}")
        self.student_temp = student_temp
        self.centre_momentum = centre_momentum
        self.register_buffer("centre", torch.zeros(1, n_prototypes))

    @torch.no_grad()
    def teacher_targets(self, teacher_logits: torch.Tensor, teacher_temp: float) -> torch.Tensor:
        """softmax((teacher_logits - centre) / teacher_temp), rows of (N, K), no gradient."""
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
        """centre <- m * centre + (1 - m) * mean of the teacher logits over all rows of all ranks."""
        total = teacher_logits.float().sum(dim=0, keepdim=True)
        count = torch.tensor([float(teacher_logits.shape[0])], device=total.device)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(total)
            dist.all_reduce(count)
        if count.item() == 0:
            return
        self.centre.mul_(self.centre_momentum).add_(total / count, alpha=1.0 - self.centre_momentum)


def entropy(probs: torch.Tensor) -> torch.Tensor:
    """Mean Shannon entropy (nats) of the rows of a probability matrix: 0 = one-hot, log K = uniform."""
    return -(probs * probs.clamp(min=1e-12).log()).sum(dim=-1).mean()
