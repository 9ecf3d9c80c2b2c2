"""The one device resolver: config names ("auto", "cpu", "cuda", "cuda:N") to a torch device, with a clear
error, and the peak memory of a run on it.

Every job uses it: finetuning, prediction, the 2D baselines, domain analysis and each pretraining rank.
"""
from __future__ import annotations

import resource
import sys
from pathlib import Path

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


class PeakMemory:
    """Peak memory since `reset()`: CUDA max allocated on a GPU, else the process's peak RSS (VmHWM, which
    Linux resets through /proc/self/clear_refs; elsewhere the peak of the whole process)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def reset(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            return
        try:
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            pass

    def peak_mb(self) -> float:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**20
        try:
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
        except OSError:
            pass
        scale = 2**20 if sys.platform == "darwin" else 2**10
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / scale
