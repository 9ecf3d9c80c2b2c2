"""Soft-clDice (Shit et al., CVPR 2021): a topology-aware loss on soft skeletons of tubular structures.

The soft skeleton is built by iterated min/max pooling: soft erosion is a min-pool over the 6-neighbourhood
(three axis-wise 3-voxel min-pools, `-maxpool(-x)`), soft dilation a 3x3x3 max-pool, and each iteration adds
what an opening removes. MONAI 1.6's `SoftclDiceLoss` implements exactly this for 3D inputs (B, C, D, H, W),
and the 2D version (4-neighbourhood erosion, 3x3 dilation) for (B, C, H, W) inputs, which the 2D arms of
`lsmfm compare` and `lsmfm baseline2d` train with; it reduces per batch item, so we wrap it instead of
copying it; the wrapper fixes the choices we use
everywhere (one foreground channel, sigmoid on logits, smoothing 1 so empty patches are well defined).

Example:
    >>> loss = SoftClDiceLoss(iterations=3)
    >>> logits = torch.randn(2, 1, 32, 32, 32, requires_grad=True)
    >>> target = (torch.rand(2, 1, 32, 32, 32) > 0.9).float()
    >>> loss(logits, target).backward()
"""
from __future__ import annotations

import torch
import lsmfm._monai  # noqa: F401  (before any MONAI import: MONAI without transformers)
from monai.losses.cldice import SoftclDiceLoss, soft_skel  # noqa: I001
from torch import nn


def soft_skeleton(x: torch.Tensor, iterations: int = 3) -> torch.Tensor:
    """Soft skeleton of probabilities `x`, (B, C, D, H, W) in 3D or (B, C, H, W) in 2D, in [0, 1];
    `iterations` should reach the largest radius of the structures (a tube of radius r needs about r
    iterations)."""
    if x.ndim not in (4, 5):
        raise ValueError(f"soft_skeleton expects (B, C, D, H, W) or (B, C, H, W), got shape "
                         f"{tuple(x.shape)}")
    return soft_skel(x, iterations)


class SoftClDiceLoss(nn.Module):
    """1 - soft-clDice between a prediction and a binary target, averaged over the batch.

    Args:
        iterations: soft-skeleton iterations (>= 0).
        smooth: added to numerator and denominator of topology precision and sensitivity; with 1.0 an
            empty prediction against an empty target costs ~0 and anything against an empty target is
            penalised smoothly.
        from_logits: apply a sigmoid to the prediction first (our heads output logits).
    """

    def __init__(self, iterations: int = 3, smooth: float = 1.0, from_logits: bool = True) -> None:
        super().__init__()
        if iterations < 0:
            raise ValueError(f"clDice iterations must be >= 0, got {iterations}")
        self.iterations = int(iterations)
        self.loss = SoftclDiceLoss(iter_=int(iterations), smooth_nr=smooth, smooth_dr=smooth,
                                   sigmoid=from_logits, reduction="mean")

    def forward(self, prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if prediction.ndim not in (4, 5) or prediction.shape != target.shape:
            raise ValueError(f"clDice expects prediction and target of the same (B, C, D, H, W) or "
                             f"(B, C, H, W) shape, got "
                             f"{tuple(prediction.shape)} and {tuple(target.shape)}")
        return self.loss(prediction, target.to(prediction.dtype))
