"""FacT (factor-tuning): q and v updates U -> core_l -> V, with U and V shared by all layers.

U (dim x rank) and V (rank x dim) live once on the encoder (`fact_u`, `fact_v`); each layer owns two
rank x rank cores for q and v. V starts at zero, so the adapted encoder starts as the pretrained one.
"""

from __future__ import annotations

import torch
from torch import nn

from lsmfm.baselines2d.config import PeftConfig
from lsmfm.baselines2d.methods.common import add_qv_deltas
from lsmfm.baselines2d.models.base import Segmenter2D


class FacTDelta(nn.Module):
    """V(dropout(core(U(x)))); U and V are held by reference, not registered twice."""

    def __init__(self, shared: tuple[nn.Linear, nn.Linear], rank: int, dropout: float) -> None:
        super().__init__()
        self.shared = shared
        self.core = nn.Linear(rank, rank, bias=False)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u, v = self.shared
        return v(self.dropout(self.core(u(x))))


def apply(model: Segmenter2D, cfg: PeftConfig) -> None:
    dim = model.hidden_size
    model.encoder.fact_u = nn.Linear(dim, cfg.rank, bias=False)
    model.encoder.fact_v = nn.Linear(cfg.rank, dim, bias=False)
    nn.init.zeros_(model.encoder.fact_v.weight)
    shared = (model.encoder.fact_u, model.encoder.fact_v)
    add_qv_deltas(model, lambda i, o: FacTDelta(shared, cfg.rank, cfg.dropout))
