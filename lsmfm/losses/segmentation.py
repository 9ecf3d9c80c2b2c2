"""Binary segmentation loss: weighted Dice + (BCE or focal) + soft-clDice, all on logits.

Dice keeps sparse foreground (0.2 % for plaques) from being drowned by background; the voxel-wise term
gives well-calibrated probabilities; soft-clDice rewards connected thin structures (vessels). Setting a
weight to 0 drops its term (and its cost: clDice pooling is skipped). 3D outputs (B, 1, D, H, W) and 2D
outputs (B, 1, H, W) alike: the 2D arms of a comparison train with the same module, the 2D soft skeleton.

Example:
    >>> loss = SegmentationLoss(dice_weight=1.0, bce_weight=1.0, cldice_weight=0.5)
    >>> logits = torch.randn(2, 1, 32, 32, 32)
    >>> target = (torch.rand(2, 1, 32, 32, 32) > 0.9).float()
    >>> total = loss(logits, target)          # weighted sum
    >>> parts = loss.terms(logits, target)    # {"dice": ..., "bce": ..., "cldice": ...} for logging
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import lsmfm._monai  # noqa: F401  (before any MONAI import: MONAI without transformers)
from monai.losses import DiceLoss, FocalLoss  # noqa: I001
from torch import nn

from lsmfm.losses.cldice import SoftClDiceLoss


class SegmentationLoss(nn.Module):
    """Weighted sum of Dice, a voxel-wise term (BCE, or focal when `focal`) and soft-clDice.

    Args:
        dice_weight: weight of the soft Dice loss, computed over the whole batch (stable when a
            patch has little or no foreground).
        bce_weight: weight of the voxel-wise term: BCE with logits, or the sigmoid focal loss.
        focal: use the focal loss (down-weights easy background voxels) instead of BCE.
        focal_gamma: focusing exponent of the focal loss.
        cldice_weight: weight of soft-clDice.
        cldice_iters: soft-skeleton iterations (about the largest structure radius in voxels).
    """

    def __init__(self, dice_weight: float = 1.0, bce_weight: float = 1.0, focal: bool = False,
                 focal_gamma: float = 2.0, cldice_weight: float = 0.5, cldice_iters: int = 3) -> None:
        super().__init__()
        weights = {"dice": dice_weight, "bce": bce_weight, "cldice": cldice_weight}
        if min(weights.values()) < 0 or sum(weights.values()) <= 0:
            raise ValueError(f"segmentation loss weights must be >= 0 with a positive sum, got {weights}")
        self.weights = {("focal" if k == "bce" and focal else k): float(w) for k, w in weights.items()}
        self.dice = DiceLoss(sigmoid=True, batch=True)
        self.focal = FocalLoss(gamma=focal_gamma, use_softmax=False) if focal else None
        self.cldice = SoftClDiceLoss(iterations=cldice_iters, from_logits=True)

    def terms(self, logits: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
        """Each unweighted term with a non-zero weight, by name."""
        if logits.shape != target.shape or logits.ndim not in (4, 5):
            raise ValueError(f"expected logits and target of the same (B, 1, D, H, W) or (B, 1, H, W) "
                             f"shape, got {tuple(logits.shape)} and {tuple(target.shape)}")
        target = target.to(logits.dtype)
        out: dict[str, torch.Tensor] = {}
        if self.weights["dice"]:
            out["dice"] = self.dice(logits, target)
        if self.weights.get("bce"):
            out["bce"] = F.binary_cross_entropy_with_logits(logits, target)
        if self.weights.get("focal"):
            assert self.focal is not None
            out["focal"] = self.focal(logits, target)
        if self.weights["cldice"]:
            out["cldice"] = self.cldice(logits, target)
        return out

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        terms = self.terms(logits, target)
        return sum(self.weights[k] * v for k, v in terms.items())  # type: ignore[return-value]
