"""How fast a pretraining run goes, as torchtitan reports it: patches/s and voxels/s (all ranks), the
fraction of the step spent waiting for the data loader, peak memory and, where the device's peak is
known, MFU (model FLOPs utilisation: achieved FLOP/s over the device's dense bf16 peak).

The FLOPs of one optimizer step are counted once, on the run's first step, by torch's FlopCounterMode
(convolutions, matmuls, attention; recomputation under gradient checkpointing included), and only when
MFU will be reported: on a GPU in the table below, or with `train.peak_tflops` set.

Example:
    >>> meter = ThroughputMeter(voxels_per_patch=64**3, world_size=1, device=torch.device("cpu"))
    >>> meter.record(seconds=2.0, wait=0.5, patches=4)
    >>> meter.read()["patches_per_s"]
    2.0
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Iterator

import torch

# dense bf16 tensor-core peak per device, by name (torchtitan's `get_peak_flops`); the first match wins
PEAK_TFLOPS = (("H100 NVL", 835.0), ("H100 PCIe", 756.0), ("H100", 989.0), ("H200", 989.0),
               ("B200", 2250.0), ("A100", 312.0), ("L40S", 362.0), ("MI300X", 1300.0), ("MI325X", 1300.0))


def peak_tflops(device: torch.device, configured: float = 0.0) -> float | None:
    """The device's peak TFLOP/s: `configured` when above 0, else the table's entry for this GPU, else
    None (CPUs and unknown GPUs report no MFU)."""
    if configured > 0:
        return configured
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((tflops for key, tflops in PEAK_TFLOPS if key.lower() in name.lower()), None)


def peak_memory_mb(device: torch.device) -> float:
    """Peak CUDA memory allocated on `device`, or the process's peak resident set (VmHWM) on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    status = Path("/proc/self/status")
    if not status.is_file():
        return 0.0
    line = next((s for s in status.read_text().splitlines() if s.startswith("VmHWM:")), "VmHWM: 0 kB")
    return int(line.split()[1]) / 1024


class ThroughputMeter:
    """Step times, data waits and patches of a run: `read` gives the values since the last read (for
    each log step), `summary` those of the whole run.

    Args:
        voxels_per_patch: voxels of one patch (patch_size multiplied out).
        world_size: ranks, each taking the same number of patches per step.
        device: this rank's device (peak memory, the GPU's peak FLOP/s).
        peak: peak TFLOP/s for MFU (None: no MFU).
    """

    def __init__(self, voxels_per_patch: int, world_size: int, device: torch.device,
                 peak: float | None = None) -> None:
        self.voxels_per_patch = voxels_per_patch
        self.world_size = world_size
        self.device = device
        self.peak = peak
        self.flops_per_step: float | None = None
        self._window = [0.0, 0.0, 0, 0]  # seconds, wait, local patches, steps
        self._total = [0.0, 0.0, 0, 0]

    @contextlib.contextmanager
    def count_flops(self) -> Iterator[None]:
        """Count the FLOPs of the enclosed optimizer step, once per run and only when MFU is reported."""
        if self.peak is None or self.flops_per_step is not None:
            yield
            return
        from torch.utils.flop_counter import FlopCounterMode

        counter = FlopCounterMode(display=False)
        with counter:
            yield
        self.flops_per_step = float(counter.get_total_flops())

    def record(self, seconds: float, wait: float, patches: int) -> None:
        """One optimizer step: its wall time, the part spent waiting for batches, this rank's patches."""
        for acc in (self._window, self._total):
            acc[0] += seconds
            acc[1] += wait
            acc[2] += patches
            acc[3] += 1

    def read(self) -> dict[str, float]:
        """Throughput since the last read; the window starts again."""
        values = self._values(self._window)
        self._window = [0.0, 0.0, 0, 0]
        return values

    def summary(self) -> dict[str, float]:
        """Throughput over every step recorded in this process."""
        return self._values(self._total)

    def _values(self, acc: list) -> dict[str, float]:
        seconds, wait, patches, steps = acc
        if steps == 0 or seconds <= 0:
            return {}
        rate = patches * self.world_size / seconds
        values: dict[str, Any] = {
            "patches_per_s": rate, "voxels_per_s": rate * self.voxels_per_patch,
            "data_wait_fraction": wait / seconds, "step_seconds": seconds / steps,
            "peak_memory_mb": peak_memory_mb(self.device)}
        if self.flops_per_step is not None and self.peak:
            achieved = self.flops_per_step * steps / seconds
            values["tflops_per_s"] = achieved / 1e12
            values["mfu"] = achieved / (self.peak * 1e12)
        return values
