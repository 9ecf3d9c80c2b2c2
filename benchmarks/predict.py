"""Whole-volume prediction cost: voxels per second and peak memory on a 512³ volume.

    python benchmarks/predict.py --json predict.json [--size 512] [--block 128] [--device cpu]

The input is an OME-Zarr store (uint16, chunks 64³, with ingest-style intensity statistics) generated
slab by slab in a temporary folder, so the benchmark itself never holds the volume. The model is a small
UNet segmentation model (channels 8-16-32, one residual unit, 64³ windows) saved with `save_task_model`.
`lsmfm.tasks.predict.predict_volume` runs in a subprocess that reports its RSS after imports (baseline)
and its peak RSS (`getrusage`); the growth over the baseline is what prediction itself needs, compared
with the volume's size in float32 (512³ x 4 bytes = 512 MiB).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

BACKBONE = {"channels": [8, 16, 32], "strides": [2, 2], "num_res_units": 0, "out_channels": 8}
PATCH = 64
SLAB = 64


def make_volume(path: Path, size: int, seed: int = 0) -> None:
    """A size³ uint16 NGFF store of noisy background and bright blobs, written one z slab at a time."""
    import zarr
    from scipy.ndimage import gaussian_filter

    from lsmfm.io.omezarr import create_level, multiscales_metadata, write_ome

    root = zarr.open_group(str(path), mode="w", zarr_format=3)
    level = create_level(root, "0", (1, size, size, size), "uint16", 64)
    samples = []
    for z0 in range(0, size, SLAB):
        rng = np.random.default_rng(seed + z0)
        depth = min(SLAB, size - z0)
        spots = (rng.random((depth, size, size)) > 0.9995).astype(np.float32)
        slab = 100 + 30000 * gaussian_filter(spots, 2.0) + rng.normal(0, 20, spots.shape)
        slab = np.clip(slab, 0, 65535).astype(np.uint16)
        level[0, z0:z0 + depth] = slab
        samples.append(slab[::4, ::4, ::4].ravel())
    qs = [0.5, 1.0, 50.0, 99.0, 99.5]
    values = np.percentile(np.concatenate(samples), qs)
    stats = {"percentiles": {str(q): float(v) for q, v in zip(qs, values)}}
    write_ome(root, {"multiscales": [multiscales_metadata("benchmark", (2.0, 1.0, 1.0), [], "none")]},
              extra={"lsmfm": {"intensity": [stats]}})


def make_model(path: Path) -> None:
    import torch

    from lsmfm.models.backbones import BackboneConfig, build_backbone
    from lsmfm.tasks.models import build_task_model, save_task_model
    from lsmfm.weights.format import ModelConfig

    torch.manual_seed(0)
    backbone = build_backbone(BackboneConfig(**BACKBONE))
    model = build_task_model("segment", backbone)
    save_task_model(model, path, ModelConfig(backbone=backbone.config, patch_size=[PATCH] * 3))


def _rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def measure(model: str, volume: str, out: str, block: int, overlap: float, batch: int, device: str,
            threads: int) -> dict:
    """Run in the child process: one prediction, with RSS before (all code imported) and the peak after."""
    import resource

    import monai.inferers  # noqa: F401  (imported before the baseline: code is not prediction memory)
    import torch
    import zarr  # noqa: F401

    import lsmfm.tasks.models  # noqa: F401
    from lsmfm.tasks.predict import PredictOptions, predict_volume

    if threads:
        torch.set_num_threads(threads)
    baseline = _rss_mib()
    opts = PredictOptions(block=block, overlap=overlap, batch_size=batch, device=device)
    summary = predict_volume(model, volume, out, opts, progress=False)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    keys = ("shape", "blocks", "seconds", "voxels", "voxels_per_s", "bounds_source")
    result = {k: summary[k] for k in keys}
    result.update({"rss_baseline_mib": baseline, "rss_peak_mib": peak, "rss_growth_mib": peak - baseline,
                   "torch_threads": torch.get_num_threads(), "device": device})
    if device.startswith("cuda"):
        result["cuda_peak_mib"] = torch.cuda.max_memory_allocated() / 2 ** 20
    return result


def run(args: argparse.Namespace) -> dict:
    with tempfile.TemporaryDirectory(prefix="lsmfm_predict_bench_") as tmp:
        root = Path(tmp)
        start = time.perf_counter()
        make_volume(root / "volume.zarr", args.size)
        make_model(root / "model")
        setup_s = time.perf_counter() - start
        cmd = [sys.executable, __file__, "--measure", str(root / "model"), str(root / "volume.zarr"),
               str(root / "pred.zarr"), "--block", str(args.block), "--overlap", str(args.overlap),
               "--batch", str(args.batch), "--device", args.device, "--threads", str(args.threads)]
        child = subprocess.run(cmd, check=True, capture_output=True, text=True)
        result = json.loads(child.stdout.strip().splitlines()[-1])
    float32_mib = args.size ** 3 * 4 / 2 ** 20
    result.update({"size": args.size, "block": args.block, "overlap": args.overlap, "batch": args.batch,
                   "patch": PATCH, "backbone": BACKBONE, "setup_s": setup_s,
                   "volume_float32_mib": float32_mib,
                   "growth_over_float32": result["rss_growth_mib"] / float32_mib,
                   "peak_over_float32": result["rss_peak_mib"] / float32_mib})
    return result


def table(r: dict) -> str:
    head = (f"{r['size']}³ uint16 OME-Zarr, UNet {'-'.join(map(str, r['backbone']['channels']))} with "
            f"{r['patch']}³ windows, block {r['block']}, overlap {r['overlap']}, batch {r['batch']}, "
            f"{r['device']} ({r['torch_threads']} threads)")
    cols = ["blocks", "seconds", "Mvoxel/s", "RSS base MiB", "RSS peak MiB", "growth MiB", "growth/float32",
            "peak/float32"]
    vals = [str(r["blocks"]), f"{r['seconds']:.1f}", f"{r['voxels_per_s'] / 1e6:.3f}",
            f"{r['rss_baseline_mib']:.0f}", f"{r['rss_peak_mib']:.0f}", f"{r['rss_growth_mib']:.0f}",
            f"{r['growth_over_float32']:.3f}", f"{r['peak_over_float32']:.3f}"]
    widths = [max(len(c), len(v)) for c, v in zip(cols, vals)]
    lines = [head, "  ".join(c.rjust(w) for c, w in zip(cols, widths)),
             "  ".join(v.rjust(w) for v, w in zip(vals, widths)),
             f"(volume in float32: {r['volume_float32_mib']:.0f} MiB)"]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=512, help="edge of the cubic test volume (512)")
    parser.add_argument("--block", type=int, default=128, help="prediction block core edge (128)")
    parser.add_argument("--overlap", type=float, default=0.25)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--json", default=None, help="write the result to this JSON file")
    parser.add_argument("--measure", nargs=3, metavar=("MODEL", "VOLUME", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        model, volume, out = args.measure
        print(json.dumps(measure(model, volume, out, args.block, args.overlap, args.batch, args.device,
                                 args.threads)))
        return 0
    result = run(args)
    print(table(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
