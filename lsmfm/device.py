"""The one device resolver: config names ("auto", "cpu", "cuda", "cuda:N") to a torch device, with a clear error.

Every job uses it: finetuning, prediction, the 2D baselines, domain analysis and each pretraining rank.
"""
from __future__ import annotations

import torch

from lsmfm.errors import ConfigError


def resolve_device(name: str, local_rank: int | None = None) -> torch.device:
    """`auto`: CUDA when there is one, else the CPU; a CUDA name without CUDA is an error.

    A bare `cuda` (or `auto` on a GPU machine) is this process's GPU `cuda:<local_rank>` when
    `local_rank` is given (one process per GPU, as torchrun starts them), else CUDA's current device.
    """
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device={name} but CUDA is not available here; use device=cpu or auto")
    if name == "cuda" and local_rank is not None:
        return torch.device("cuda", local_rank)
    return torch.device(name)
