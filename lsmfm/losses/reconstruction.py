"""Masked reconstruction: predict the original intensities where the student's input was masked.

Example:
    >>> loss = MaskedReconstructionLoss("l1")
    >>> pred, target = torch.zeros(1, 1, 2, 2, 2), torch.ones(1, 1, 2, 2, 2)
    >>> mask = torch.zeros(1, 2, 2, 2, dtype=torch.bool); mask[0, 0] = True
    >>> float(loss(pred, target, mask))
    1.0
"""
from __future__ import annotations

from typing import Literal

import torch
from torch import nn


class MaskedReconstructionLoss(nn.Module):
    """L1 or L2 error averaged over masked voxels (and channels) only.

    Unmasked voxels are visible to the student, so copying them would be trivial and dilute the loss.
    A batch without masked voxels gives 0 (still attached to the graph, so backward works).

    Args:
        kind: "l1" (mean absolute error) or "l2" (mean squared error).
    """

    def __init__(self, kind: Literal["l1", "l2"] = "l2") -> None:
        super().__init__()
        if kind not in ("l1", "l2"):
            raise ValueError(f"reconstruction kind must be 'l1' or 'l2', got {kind!r}")
        self.kind = kind

    def forward(self, pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """pred, target (B, C, D, H, W); mask (B, D, H, W) bool, True = masked -> scalar loss."""
        if pred.shape != target.shape or mask.shape != pred.shape[:1] + pred.shape[2:]:
            raise ValueError(f"shapes differ: pred {tuple(pred.shape)}, target {tuple(target.shape)}, "
                             f"mask {tuple(mask.shape)}")
        diff = pred.float() - target.float()
        err = diff.abs() if self.kind == "l1" else diff.square()
        weight = mask.unsqueeze(1).to(err.dtype)
        count = weight.sum() * pred.shape[1]
        return (err * weight).sum() / count.clamp(min=1.0)
