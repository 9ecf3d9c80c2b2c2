"""Building blocks shared by the PEFT methods: finding a layer's parts and wrapping them.

Wrappers keep the wrapped module as `base_layer` (as peft does), so a frozen weight keeps its name
with `.base_layer` inserted, and add only the method's own parameters.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch
from torch import nn

from lsmfm.baselines2d.models.base import Segmenter2D


def get_part(layer: nn.Module, path: str) -> nn.Module:
    return layer.get_submodule(path)


def set_part(layer: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(layer.get_submodule(parent) if parent else layer, name, module)


def wrap_part(layer: nn.Module, path: str, wrap: Callable[[nn.Module], nn.Module]) -> None:
    """Replace the part at `path` by `wrap(part)`."""
    set_part(layer, path, wrap(get_part(layer, path)))


def linear_width(module: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of a Linear, also when it is already wrapped or 4-bit quantised."""
    while not hasattr(module, "in_features") and hasattr(module, "base_layer"):
        module = module.base_layer
    return int(module.in_features), int(module.out_features)


class AddDelta(nn.Module):
    """`base_layer(x) + delta(x)`: an additive update beside a frozen projection."""

    def __init__(self, base_layer: nn.Module, delta: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.delta = delta

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base_layer(x) + self.delta(x)


class FusedQKVDelta(nn.Module):
    """Adds `q_delta(x)` and `v_delta(x)` to the q and v thirds of a fused qkv projection; k is untouched."""

    def __init__(self, base_layer: nn.Module, q_delta: nn.Module, v_delta: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.q_delta = q_delta
        self.v_delta = v_delta

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.base_layer(x).chunk(3, dim=-1)
        return torch.cat([q + self.q_delta(x), k, v + self.v_delta(x)], dim=-1)


class LoRADelta(nn.Module):
    """B(A(dropout(x))) * alpha / rank, with A Kaiming-uniform and B zero: the update starts at zero."""

    def __init__(self, in_features: int, out_features: int, rank: int, alpha: float, dropout: float) -> None:
        super().__init__()
        self.lora_A = nn.Linear(in_features, rank, bias=False)
        self.lora_B = nn.Linear(rank, out_features, bias=False)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.scaling = alpha / rank
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lora_B(self.lora_A(self.dropout(x))) * self.scaling


def add_qv_deltas(model: Segmenter2D, make_delta: Callable[[int, int], nn.Module]) -> None:
    """Give every layer's query and value projections an additive update `make_delta(in, out)`.

    A fused qkv (SAM) gets one wrapper adapting only its q and v slices; separate q/v projections
    (DINO, CLIP) are wrapped one by one.
    """
    layout = model.layout
    for layer in model.layers:
        if layout.qkv:
            qkv = get_part(layer, layout.qkv)
            d_in, d_out = linear_width(qkv)
            d = d_out // 3
            set_part(layer, layout.qkv, FusedQKVDelta(qkv, make_delta(d_in, d), make_delta(d_in, d)))
        else:
            for path in (layout.q, layout.v):
                d_in, d_out = linear_width(get_part(layer, path))
                wrap_part(layer, path, lambda m, i=d_in, o=d_out: AddDelta(m, make_delta(i, o)))


def unfreeze(modules: Iterable[nn.Module], only_bias: bool = False) -> None:
    """Make the parameters of `modules` (or only their biases) trainable."""
    for module in modules:
        for name, p in module.named_parameters():
            if not only_bias or name.endswith("bias"):
                p.requires_grad_(True)
