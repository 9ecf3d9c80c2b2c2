"""The throughput meter behind `perf/*` in pretraining logs: rates, data-wait fraction, FLOPs and MFU."""
from __future__ import annotations

import pytest
import torch

from lsmfm.training.throughput import ThroughputMeter, peak_tflops


def test_rates_wait_fraction_and_windows():
    meter = ThroughputMeter(voxels_per_patch=1000, world_size=2, device=torch.device("cpu"))
    meter.record(seconds=2.0, wait=0.5, patches=4)
    meter.record(seconds=2.0, wait=0.0, patches=4)
    window = meter.read()
    assert window["patches_per_s"] == pytest.approx(4.0)  # 8 patches per rank, 2 ranks, 4 s
    assert window["voxels_per_s"] == pytest.approx(4000.0)
    assert window["data_wait_fraction"] == pytest.approx(0.125) and window["step_seconds"] == 2.0
    assert window["peak_memory_mb"] > 0 and "mfu" not in window  # no peak: no MFU
    assert meter.read() == {}  # the window started again
    meter.record(seconds=1.0, wait=1.0, patches=2)
    assert meter.summary()["patches_per_s"] == pytest.approx(20 / 5)


def test_flops_counted_once_and_mfu_against_the_peak():
    meter = ThroughputMeter(1, 1, torch.device("cpu"), peak=peak_tflops(torch.device("cpu"), 1e-6))
    a, b = torch.rand(64, 32), torch.rand(32, 16)
    with meter.count_flops():
        a @ b
    with meter.count_flops():  # counted on the first step only
        a @ b @ b.t()
    assert meter.flops_per_step == 2 * 64 * 32 * 16
    meter.record(seconds=0.5, wait=0.0, patches=1)
    values = meter.read()
    assert values["tflops_per_s"] == pytest.approx(2 * 64 * 32 * 16 / 0.5 / 1e12)
    assert values["mfu"] == pytest.approx(values["tflops_per_s"] / 1e-6)


def test_peak_is_configured_or_looked_up_only_on_known_gpus():
    assert peak_tflops(torch.device("cpu")) is None and peak_tflops(torch.device("cpu"), 312.0) == 312.0
    quiet = ThroughputMeter(1, 1, torch.device("cpu"))
    with quiet.count_flops():
        torch.rand(4, 4) @ torch.rand(4, 4)
    assert quiet.flops_per_step is None  # no MFU to report: nothing counted


@pytest.mark.parametrize("name, tflops", [("NVIDIA H100 80GB HBM3", 989.0), ("NVIDIA H100 PCIe", 756.0),
                                          ("NVIDIA H200", 989.0), ("NVIDIA A100-SXM4-80GB", 312.0),
                                          ("Tesla T4", None)])
def test_gpu_peak_table(monkeypatch, name, tflops):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    assert peak_tflops(torch.device("cuda")) == tflops
