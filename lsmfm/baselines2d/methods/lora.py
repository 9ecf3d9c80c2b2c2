"""LoRA on the query and value projections of every encoder attention layer.

Separate q_proj/v_proj layers (DINOv2, DINOv3, CLIP) use the peft library; SAM's fused `qkv` gets a
wrapper that adapts only its q and v slices. Either way each adapted projection adds
rank * (in + out) parameters: 12 x 2 x (768 x 32 + 32 x 768) = 1,179,648 for ViT-B at rank 32.
"""

from __future__ import annotations

from lsmfm.baselines2d.config import PeftConfig
from lsmfm.baselines2d.methods.common import LoRADelta, add_qv_deltas
from lsmfm.baselines2d.models.base import Segmenter2D


def apply(model: Segmenter2D, cfg: PeftConfig) -> None:
    if model.layout.qkv:
        add_qv_deltas(model, lambda i, o: LoRADelta(i, o, cfg.rank, cfg.alpha, cfg.dropout))
    else:
        add_peft_lora(model, cfg)


def add_peft_lora(model: Segmenter2D, cfg: PeftConfig) -> None:
    """peft's LoRA, injected in place into the encoder's q and v projections (exact module paths)."""
    from lsmfm.extras import require

    peft = require("peft", "baselines", "the LoRA baselines")
    LoraConfig, inject_adapter_in_model = peft.LoraConfig, peft.inject_adapter_in_model

    layout = model.layout
    prefix = model.layers_path.replace(".", r"\.")
    names = "|".join(p.replace(".", r"\.") for p in (layout.q, layout.v))
    target = rf"^{prefix}\.\d+\.({names})$"
    inject_adapter_in_model(
        LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=target),
        model.encoder,
    )
