"""The distillation centre across ranks: the all-reduce is started without waiting (dinov2) and lands
before the centre is read, in the targets and in the state dict, equal on every rank to the centre of the
rows of all ranks together (ranks with different row counts, one with none)."""
from __future__ import annotations

import torch
from dist_helpers import run_on_ranks

from lsmfm.losses.distillation import DistillationLoss

ROWS = {0: torch.tensor([[1.0, 0.0, 2.0], [3.0, 2.0, 0.0]]), 1: torch.tensor([[5.0, 1.0, 1.0]]),
        2: torch.zeros(0, 3)}


def rank_centres(rank: int) -> tuple:
    loss = DistillationLoss(3, centre_momentum=0.5)
    loss.update_centre(ROWS[rank])
    pending = loss._pending is not None
    state = loss.state_dict()["centre"].clone()  # the hook applies the pending update
    loss.update_centre(ROWS[rank])
    targets = loss.teacher_targets(torch.zeros(1, 3), teacher_temp=1.0)  # applies it before reading
    return pending, state, loss.centre.clone(), targets


def test_centre_update_is_asynchronous_and_equals_the_all_rank_mean():
    results = run_on_ranks(rank_centres, 3)
    mean = torch.cat(list(ROWS.values())).mean(dim=0, keepdim=True)  # (3, 1, 1) = [3, 1, 1]
    first, second = 0.5 * mean, 0.75 * mean
    for rank in ROWS:
        pending, state, centre, targets = results[rank]
        assert pending, "the centre update should wait for the all-reduce lazily"
        assert torch.allclose(state, first) and torch.allclose(centre, second)
        assert torch.allclose(targets, torch.softmax(-second, dim=-1))


def test_no_rows_anywhere_leaves_the_centre():
    loss = DistillationLoss(3)
    loss.centre.fill_(2.0)
    loss.update_centre(torch.zeros(0, 3))
    assert torch.equal(loss.centre, torch.full((1, 3), 2.0))
