"""The DeepSpeed engine: one config builder and one initialiser for CPU tests and multi-node GPU runs.

Two DeepSpeed defaults cost minutes on every start and are avoided here:
- the optimizer is a torch `AdamW` built from the model's parameter groups and passed in, so DeepSpeed
  never JIT-builds its fused Adam;
- the shared-memory CPU all-reduce op (`deepspeed_shm_comm`, ~47 s to compile) is marked incompatible
  in `deepspeed.ops.__compatible_ops__` before the process group is wrapped; gloo does the reductions.

Precision: bf16 on GPU through DeepSpeed's `torch_autocast` (weights stay fp32, matmuls and
convolutions run in bf16, gradients of those layers are reduced in bf16), fp32 on CPU. DeepSpeed's
`bf16` mode is not used because it casts the whole module, the EMA teacher included, to bf16, where a
momentum-0.996 update (a 0.4 % step) falls below the format's resolution. ZeRO stage 0, 1 or 2.
"""
from __future__ import annotations

from typing import Any, Literal, Sequence

import torch
from torch import nn

Precision = Literal["auto", "fp32", "bf16"]


def resolve_precision(precision: Precision, device: torch.device) -> str:
    """`auto` means bf16 on CUDA and fp32 elsewhere (CPU bf16 convolutions are slow and unsupported)."""
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    return precision


def build_ds_config(*, micro_batch: int, grad_accum: int, world_size: int, zero_stage: int,
                    precision: str, grad_clip: float) -> dict[str, Any]:
    """The DeepSpeed config dict: batch arithmetic, ZeRO stage, precision and gradient clipping."""
    if zero_stage not in (0, 1, 2):
        raise ValueError(f"zero_stage must be 0, 1 or 2, got {zero_stage}")
    return {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": grad_accum,
        "train_batch_size": micro_batch * grad_accum * world_size,
        "gradient_clipping": grad_clip,
        "zero_optimization": {"stage": zero_stage, "overlap_comm": False, "contiguous_gradients": True},
        "torch_autocast": {"enabled": precision == "bf16", "dtype": "bfloat16"},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
        "zero_allow_untested_optimizer": True,
    }


def make_optimizer(param_groups: Sequence[dict[str, Any]], lr: float,
                   betas: Sequence[float]) -> torch.optim.AdamW:
    """Plain torch AdamW; each group keeps its "name" so its learning rate can be scaled per step."""
    groups = [dict(g) for g in param_groups]
    for g in groups:
        g.setdefault("lr", lr)
    return torch.optim.AdamW(groups, lr=lr, betas=(float(betas[0]), float(betas[1])))


def disable_shm_comm() -> None:
    """Keep DeepSpeed from compiling its shared-memory all-reduce op (gloo is used instead)."""
    from lsmfm.extras import require

    ops = require("deepspeed.ops", "train", "pretraining")
    ops.__compatible_ops__["deepspeed_shm_comm"] = False


def initialize(model: nn.Module, optimizer: torch.optim.Optimizer, ds_config: dict[str, Any]) -> Any:
    """Wrap `model` and `optimizer` in a DeepSpeed engine; the process group must already exist."""
    from lsmfm.extras import require

    deepspeed = require("deepspeed", "train", "pretraining")
    disable_shm_comm()
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config,
                                           dist_init_required=False)
    return engine


def set_group_lrs(engine: Any, base_lr: float, scales: dict[str, float]) -> dict[str, float]:
    """Set each optimizer group's lr to `base_lr * scales[name]` (scale 1 when unnamed); returns them."""
    lrs: dict[str, float] = {}
    for i, group in enumerate(engine.optimizer.param_groups):
        name = group.get("name", f"group{i}")
        group["lr"] = base_lr * float(scales.get(name, 1.0))
        lrs[name] = group["lr"]
    return lrs
