"""Fault 1: with one sample per rank the CLIP loss must still see negatives from the other rank.

Two CPU processes (gloo on loopback), per-rank batch 1 with different descriptions: the loss is non-zero,
the gradient on the local image features is non-zero, and the loss equals the single-process loss on the
concatenated batch.
"""
from __future__ import annotations

import torch
from dist_helpers import run_on_ranks

from lsmfm.losses.clip import ClipLoss, text_ids

TEXTS = ["GFAP astrocytes, cleared mouse brain", "SYTO 24 nuclei, dense"]


def features() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(2, 8, generator=g), torch.randn(2, 8, generator=g)


def rank_loss(rank: int) -> tuple[float, float, float]:
    img, txt = features()
    local_img = img[rank:rank + 1].clone().requires_grad_(True)
    local_txt = txt[rank:rank + 1].clone().requires_grad_(True)
    torch.manual_seed(0)
    out = ClipLoss(init_temperature=0.1)(local_img, local_txt, text_ids(TEXTS[rank:rank + 1]))
    out.loss.backward()
    return out.loss.item(), local_img.grad.abs().sum().item(), local_txt.grad.abs().sum().item()


def test_two_ranks_batch_one_gives_nonzero_loss_and_gradient():
    results = run_on_ranks(rank_loss, 2)
    img, txt = features()
    single = ClipLoss(init_temperature=0.1)(img, txt, text_ids(TEXTS)).loss.item()
    assert single > 0.01
    for rank in (0, 1):
        loss, img_grad, txt_grad = results[rank]
        assert abs(loss - single) < 1e-5, (rank, loss, single)
        assert img_grad > 0 and txt_grad > 0


def test_without_gathering_batch_one_would_be_zero():
    """The paper's per-GPU loss: a batch of one has no negative, so the loss and its gradient vanish."""
    img, txt = features()
    local = img[:1].clone().requires_grad_(True)
    out = ClipLoss(init_temperature=0.1)(local, txt[:1], text_ids(TEXTS[:1]))
    out.loss.backward()
    assert out.loss.item() == 0.0 and local.grad.abs().sum().item() == 0.0
