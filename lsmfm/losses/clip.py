"""CLIP-style image-text loss, gathered across ranks so every rank sees the global batch.

The paper's code computes the contrastive loss per GPU; with one sample per GPU the only "negative" is
missing and the loss is exactly 0. Here image and text features are all-gathered (open_clip's pattern:
gather without gradient, then put the local tensor back in its slice, so gradients flow for the local
shard) and every rank computes the loss over the global batch.

Identical descriptions: two samples with the same text are not negatives of each other. Their
off-diagonal logits are masked out (set to the dtype's minimum) in both directions, so each row keeps a
single positive (its own pair) and only different-text samples as negatives. A batch whose texts are
all identical therefore gives a loss of 0 and no gradient rather than a meaningless push-apart.

Example:
    >>> loss = ClipLoss()
    >>> out = loss(torch.randn(4, 8), torch.randn(4, 8), text_ids(["a", "b", "a", "c"]))
    >>> out.loss.shape, 0.0 <= out.top1 <= 1.0
    (torch.Size([]), True)
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


def text_ids(texts: Sequence[str], device: torch.device | str | None = None) -> torch.Tensor:
    """Stable int64 id per description (a hash of its UTF-8 bytes), equal on every rank and run."""
    ids = [int.from_bytes(hashlib.blake2b(t.encode("utf-8"), digest_size=8).digest(), "little", signed=True)
           for t in texts]
    return torch.tensor(ids, dtype=torch.long, device=device)


def gather_with_local_grad(x: torch.Tensor) -> torch.Tensor:
    """All-gather `x` (same shape on every rank) along dim 0; only the local slice keeps its gradient."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    parts = [torch.zeros_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.detach().contiguous())
    parts[dist.get_rank()] = x
    return torch.cat(parts, dim=0)


@dataclass
class ClipResult:
    """loss: symmetric InfoNCE over the global batch; align: mean (1 - cosine) of the local pairs;
    top1: image-to-text retrieval accuracy in the global batch (a same-text hit counts as correct), a 0-d
    tensor left on the device (reading it is a host sync)."""

    loss: torch.Tensor
    align: torch.Tensor
    top1: torch.Tensor


class ClipLoss(nn.Module):
    """Symmetric InfoNCE with a learnable temperature, gathered across ranks.

    Args:
        init_temperature: initial softmax temperature (CLIP: 0.07); learned as log(1/T).
        max_logit_scale: upper clamp of 1/T (CLIP: 100) so the logits cannot blow up.
        align_detach_text: the align term moves the image embedding only (the paper's); else both.
    """

    def __init__(self, init_temperature: float = 0.07, max_logit_scale: float = 100.0,
                 align_detach_text: bool = False) -> None:
        super().__init__()
        self.align_detach_text = align_detach_text
        if not 0.0 < init_temperature <= 1.0 or max_logit_scale <= 1.0:
            raise ValueError(f"need 0 < init_temperature <= 1 and max_logit_scale > 1, got "
                             f"{init_temperature}, {max_logit_scale}")
        self.max_log_scale = math.log(max_logit_scale)
        # shape (1,), not a 0-dim scalar: DeepSpeed broadcasts parameters as byte views, impossible for 0-dim
        self.logit_scale = nn.Parameter(torch.tensor([math.log(1.0 / init_temperature)]))

    @property
    def temperature(self) -> float:
        return float(torch.exp(-self.logit_scale.detach().clamp(max=self.max_log_scale)))

    def forward(self, image_features: torch.Tensor, text_features: torch.Tensor,
                ids: torch.Tensor) -> ClipResult:
        """image_features, text_features (B, E) of the local pairs; ids (B,) int64 from `text_ids`."""
        if image_features.shape != text_features.shape or ids.shape != image_features.shape[:1]:
            raise ValueError(f"shapes differ: image {tuple(image_features.shape)}, text "
                             f"{tuple(text_features.shape)}, ids {tuple(ids.shape)}")
        img = F.normalize(image_features.float(), dim=-1)
        txt = F.normalize(text_features.float(), dim=-1)
        align = (1.0 - (img * (txt.detach() if self.align_detach_text else txt)).sum(dim=-1)).mean()
        all_img, all_txt = gather_with_local_grad(img), gather_with_local_grad(txt)
        all_ids = gather_with_local_grad(ids)
        scale = self.logit_scale.clamp(max=self.max_log_scale).exp()
        logits = scale * all_img @ all_txt.t()
        same = all_ids[:, None] == all_ids[None, :]
        eye = torch.eye(len(all_ids), dtype=torch.bool, device=logits.device)
        logits = logits.masked_fill(same & ~eye, torch.finfo(logits.dtype).min)
        labels = torch.arange(len(all_ids), device=logits.device)
        loss = 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels))
        with torch.no_grad():
            hit = same.gather(1, logits.argmax(dim=1, keepdim=True))
        return ClipResult(loss=loss, align=align, top1=hit.float().mean())
