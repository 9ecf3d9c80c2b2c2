"""Device names in configs ("auto", "cpu", "cuda", "cuda:N") resolved once, with a clear error."""
from __future__ import annotations

import torch

from lsmfm.errors import ConfigError


def resolve_device(name: str) -> torch.device:
    """`auto`: the first CUDA device when there is one, else the CPU; a CUDA name without CUDA is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device={name} but CUDA is not available here; use device=cpu or auto")
    return torch.device(name)
