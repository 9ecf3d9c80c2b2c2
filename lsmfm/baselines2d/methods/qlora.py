"""QLoRA: the encoder's transformer linears are quantised to 4 bits (bitsandbytes NF4/FP4, frozen), then LoRA
on q and v trains in full precision beside them. Needs the optional extra: pip install 'lsmfm[qlora]'.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lsmfm.baselines2d.config import PeftConfig
from lsmfm.baselines2d.methods import lora
from lsmfm.baselines2d.methods.common import set_part
from lsmfm.baselines2d.models.base import Segmenter2D


def bitsandbytes() -> Any:
    """The bitsandbytes module, or a MissingExtra that says how to install it."""
    from lsmfm.extras import require

    return require("bitsandbytes", "qlora", "peft.method=qlora (or choose peft.method=lora)")


def quantize_linear(linear: nn.Linear, quant_type: str) -> nn.Module:
    """A frozen 4-bit copy of `linear` on the same device (quantisation happens on the move to the device)."""
    bnb = bitsandbytes()
    q = bnb.nn.Linear4bit(
        linear.in_features,
        linear.out_features,
        bias=linear.bias is not None,
        compute_dtype=torch.float32,
        quant_type=quant_type,
    )
    q.weight = bnb.nn.Params4bit(linear.weight.data.clone(), requires_grad=False, quant_type=quant_type)
    if linear.bias is not None:
        q.bias = nn.Parameter(linear.bias.data.clone(), requires_grad=False)
    return q.to(linear.weight.device)


def quantize_layers(model: Segmenter2D, quant_type: str) -> None:
    """Replace every nn.Linear inside the encoder's transformer layers by its 4-bit version."""
    for layer in model.layers:
        for name, module in list(layer.named_modules()):
            if type(module) is nn.Linear:
                set_part(layer, name, quantize_linear(module, quant_type))


def apply(model: Segmenter2D, cfg: PeftConfig) -> None:
    quantize_layers(model, cfg.quant_type)
    lora.apply(model, cfg)
