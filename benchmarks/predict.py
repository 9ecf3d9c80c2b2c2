"""Whole-volume prediction: `lsmfm predict` (blockwise, out of core) on 1 and N ranks, against one
in-memory MONAI sliding window over the whole volume, on the same model and data: voxels per second,
peak memory per rank, windows run, scaling efficiency, the cost of a resume, files per TB written, and
the largest difference between the outputs.

    python benchmarks/predict.py --json predict.json [--sizes 512] [--blocks 128 256] [--ranks 1 2]
                                 [--in-memory-up-to 512] [--resume]

Ranks > 1 run under torchrun (gloo, CPU): the ranks share the machine's cores, so on a machine with as
many cores as ranks x threads the scaling efficiency is what a cluster sees per node. `--resume` kills
(-9) a run of the largest rank count once half of its blocks are recorded, re-runs the same command,
and reports the total over one uninterrupted run. Every process runs `--threads` torch threads (1 by
default, what torchrun gives each rank): CPU convolutions sum in an order that depends on the thread
count, so outputs are identical bit for bit between runs with the same threads per process (and differ
in the last bits otherwise: 1 process on 2 threads vs 2 ranks on 1 thread each).

Each input is an OME-Zarr store (uint16, chunks 64³ in shards of 4³ chunks, with ingest-style intensity
statistics) generated slab by slab in a temporary folder, so the benchmark never holds a volume. The model is a small UNet
segmentation model (channels 8-16-32, 64³ windows) saved with `save_task_model`. Every measurement runs
in a fresh subprocess that records its RSS once all code is imported (baseline) and its peak RSS
(`getrusage`); the growth is what the prediction itself needs, compared with the volume in float32.
The in-memory baseline (`predict_core` over one whole-volume block: read, normalise, MONAI's
`sliding_window_inference`) needs several times the float32 volume, so it runs only up to
`--in-memory-up-to` (its peak at 1024³ is about 14 GiB).
"""
from __future__ import annotations

import argparse
import json
import shutil
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

    from lsmfm.models.backbones.unet import UNetConfig
    from lsmfm.tasks.models import build_task_model, save_task_model
    from lsmfm.weights.format import ModelConfig

    torch.manual_seed(0)
    backbone = UNetConfig(**BACKBONE).build()
    model = build_task_model("segment", backbone)
    save_task_model(model, path, ModelConfig(backbone=backbone.config, patch_size=[PATCH] * 3))


def _status_mib(field: str) -> float:
    """A memory field of /proc/self/status (VmRSS: now; VmHWM: peak) in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def _imported(threads: int) -> float:
    """Import everything a measurement uses, set the thread count; the RSS baseline in MiB."""
    import lsmfm.models.backbones  # noqa: F401  (first, as in `lsmfm predict`: MONAI without transformers)
    import monai.inferers  # noqa: F401  (imported before the baseline: code is not prediction memory)
    import torch
    import zarr  # noqa: F401

    import lsmfm.tasks.predict  # noqa: F401
    if threads:
        torch.set_num_threads(threads)
    return _status_mib("VmRSS")


def _peak_mib() -> float:
    """Peak RSS of this process image. Not `getrusage`: its ru_maxrss survives fork and exec, so a child
    would report the parent's RSS (here: the volume generator's) when that is larger."""
    return _status_mib("VmHWM")


def measure_blockwise(model: str, volume: str, out: str, block: int, overlap: float, batch: int,
                      device: str, threads: int) -> dict:
    """Child process (or one torchrun rank): one `predict_volume` run into `out`; each rank also writes
    its row to `<out>.rank<r>.json`."""
    import os

    baseline = _imported(threads)
    from lsmfm.tasks.predict import PredictOptions, predict_volume

    opts = PredictOptions(block=block, overlap=overlap, batch_size=batch, device=device)
    summary = predict_volume(model, volume, out, opts, progress=False)
    peak = _peak_mib()
    keys = ("blocks", "blocks_run", "blocks_resumed", "windows", "windows_one_pass", "seconds", "bounds_source",
            "ranks", "shard", "chunk", "levels")
    row = {"rank": int(os.environ.get("RANK", "0")), "rss_baseline_mib": baseline, "rss_peak_mib": peak,
           **{k: summary[k] for k in keys}}
    Path(f"{out}.rank{row['rank']}.json").write_text(json.dumps(row))
    return row


def launch_blockwise(args: list[str], ranks: int) -> subprocess.Popen:
    """One blockwise measurement on `ranks` processes (torchrun for more than one)."""
    prefix = [sys.executable] if ranks == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                   f"--nproc-per-node={ranks}"]
    return subprocess.Popen([*prefix, __file__, *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)


def blockwise(model: Path, volume: Path, out: Path, block: int, ranks: int, common: list[str]) -> dict:
    """Run and time one blockwise measurement; one row with every rank's memory."""
    start = time.perf_counter()
    proc = launch_blockwise(["--measure-blockwise", str(model), str(volume), str(out), "--block", str(block),
                             *common], ranks)
    _, err = proc.communicate()
    if proc.returncode:
        raise RuntimeError(f"blockwise run failed (exit {proc.returncode}):\n{err[-3000:]}")
    return _row(out, ranks, block, time.perf_counter() - start)


def _row(out: Path, ranks: int, block: int, wall: float) -> dict:
    per_rank = [json.loads(Path(f"{out}.rank{r}.json").read_text()) for r in range(ranks)]
    first = per_rank[0]
    seconds = max(r["seconds"] for r in per_rank)
    files = sum(1 for p in out.rglob("*") if p.is_file())
    return {"method": f"lsmfm predict, block {block}, {ranks} rank{'s' if ranks > 1 else ''}", "ranks": ranks,
            "wall_s": wall, "seconds": seconds, "rss_baseline_mib": max(r["rss_baseline_mib"] for r in per_rank),
            "rss_peak_mib": max(r["rss_peak_mib"] for r in per_rank),
            "rss_peak_per_rank_mib": [r["rss_peak_mib"] for r in per_rank], "files_written": files,
            **{k: first[k] for k in ("blocks", "windows", "windows_one_pass", "bounds_source", "shard", "chunk",
                                     "levels")},
            "blocks_run_per_rank": [r["blocks_run"] for r in per_rank]}


def resume_overhead(model: Path, volume: Path, out: Path, block: int, ranks: int, common: list[str]) -> dict:
    """kill -9 the run once half of its blocks are recorded, then the same command: the total wall time
    of both, and what the second run did."""
    ledger = out.with_name(out.name + ".partial") / ".lsmfm-ledger" / "blocks"
    start = time.perf_counter()
    proc = launch_blockwise(["--measure-blockwise", str(model), str(volume), str(out), "--block", str(block),
                             *common], ranks)
    total = None
    while proc.poll() is None:
        done = len(list(ledger.glob("*.json"))) if ledger.is_dir() else 0
        total = total or _planned_blocks(ledger)
        if total and done >= total // 2:
            kill_tree(proc.pid)
            break
        time.sleep(0.2)
    proc.wait()
    killed_at = time.perf_counter() - start
    if out.exists():
        raise RuntimeError(f"{out}: the run finished before half of its blocks were seen; use a larger volume")
    done = len(list(ledger.glob("*.json")))
    row = blockwise(model, volume, out, block, ranks, common)
    per_rank = [json.loads(Path(f"{out}.rank{r}.json").read_text()) for r in range(ranks)]
    return {"ranks": ranks, "block": block, "killed_after_s": killed_at, "blocks_done_when_killed": done,
            "blocks_resumed": per_rank[0]["blocks_resumed"], "rerun_wall_s": row["wall_s"],
            "total_wall_s": killed_at + row["wall_s"], "blocks": row["blocks"]}


def kill_tree(pid: int) -> None:
    """kill -9 a process and every descendant (torchrun starts its workers in sessions of their own)."""
    import os
    import signal

    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    tree, todo = [], [pid]
    while todo:
        tree.append(todo.pop())
        todo += children.get(tree[-1], [])
    for p in tree:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _planned_blocks(ledger: Path) -> int | None:
    try:
        return int(json.loads((ledger.parent / "run.json").read_text())["blocks"])
    except (OSError, ValueError, KeyError):
        return None


def measure_in_memory(model: str, volume: str, compare: list[str], overlap: float, batch: int, device: str,
                      threads: int) -> dict:
    """Child process: the whole volume read, normalised and predicted in memory as one block, then
    compared slab by slab (after the peak is taken) with each blockwise output in `compare`."""
    baseline = _imported(threads)
    import math

    import zarr

    from lsmfm.device import resolve_device
    from lsmfm.io.volumes import open_volume
    from lsmfm.tasks.models import load_task_model
    from lsmfm.tasks.blocks import Block, count_windows
    from lsmfm.tasks.predict import PredictOptions, normalization_bounds, predict_core

    start = time.perf_counter()
    net, config = load_task_model(model, resolve_device(device))
    vol = open_volume(volume)
    bounds, source = normalization_bounds(vol, config.normalize)
    roi = tuple(config.patch_size)
    whole = tuple(slice(0, s) for s in vol.spatial_shape)
    prob = predict_core(net, vol.czyx, Block(whole, whole), config.normalize, bounds, roi,
                        PredictOptions(overlap=overlap, batch_size=batch, device=device))[0][0]
    seconds = time.perf_counter() - start
    peak = _peak_mib()
    diff = 0.0
    for path in compare:
        stored = zarr.open_array(str(Path(path) / "0"), mode="r")
        for z0 in range(0, prob.shape[0], SLAB):
            diff = max(diff, float(np.abs(stored[0, z0:z0 + SLAB] - prob[z0:z0 + SLAB]).max()))
    voxels = math.prod(vol.spatial_shape)
    one_pass = count_windows([Block(whole, whole)], roi, overlap)
    return {"method": "in-memory sliding window", "rss_baseline_mib": baseline, "rss_peak_mib": peak,
            "blocks": 1, "windows": one_pass, "windows_one_pass": one_pass, "seconds": seconds,
            "voxels_per_s": voxels / seconds, "bounds_source": source, "max_abs_diff_vs_blockwise": diff}


def child(args: list[str]) -> dict:
    """Run one measurement in a fresh interpreter; its last stdout line is the JSON result."""
    done = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"measurement {args[0]} failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def run_size(root: Path, size: int, args: argparse.Namespace) -> tuple[list[dict], list[dict]]:
    """Generate one volume, predict it blockwise at every block size and rank count, then in memory (if
    small enough); with `args.resume`, the kill -9 + resume run at the largest rank count."""
    volume, model = root / f"volume{size}.zarr", root / "model"
    start = time.perf_counter()
    make_volume(volume, size)
    setup_s = time.perf_counter() - start
    common = ["--overlap", str(args.overlap), "--batch", str(args.batch), "--device", args.device,
              "--threads", str(args.threads)]
    rows, outs, resumes = [], [], []
    for block in args.blocks:
        for ranks in args.ranks:
            out = root / f"pred{size}_{block}_{ranks}.zarr"
            rows.append(blockwise(model, volume, out, block, ranks, common))
            outs.append(out)
        if args.resume:
            out = root / f"resume{size}_{block}.zarr"
            resumes.append({"size": size, **resume_overhead(model, volume, out, block, max(args.ranks), common)})
            outs.append(out)
    identical = [_same_store(outs[0], o) for o in outs[1:]]
    if size <= args.in_memory_up_to:
        rows.append(child(["--measure-in-memory", str(model), str(volume), *map(str, outs), *common]))
    float32_mib = size ** 3 * 4 / 2 ** 20
    single = {r["method"].rsplit(",", 1)[0]: r["seconds"] for r in rows if r.get("ranks") == 1}
    for row in rows:
        growth = row["rss_peak_mib"] - row["rss_baseline_mib"]
        base = single.get(row["method"].rsplit(",", 1)[0])
        row.update({"size": size, "volume_float32_mib": float32_mib, "setup_s": setup_s,
                    "voxels_per_s": size ** 3 / row["seconds"], "rss_growth_mib": growth,
                    "growth_over_float32": growth / float32_mib, "peak_over_float32": row["rss_peak_mib"] / float32_mib,
                    "windows_over_one_pass": row["windows"] / row["windows_one_pass"]})
        if row.get("ranks"):
            row["voxels_per_s_per_rank"] = row["voxels_per_s"] / row["ranks"]
            row["scaling_efficiency"] = base / row["seconds"] / row["ranks"] if base else None
            row["files_per_tib_float32"] = row["files_written"] / (size ** 3 * 4 / 2 ** 40)
    for resume in resumes:
        uninterrupted = next(r["wall_s"] for r in rows if r.get("ranks") == resume["ranks"])
        resume["uninterrupted_wall_s"] = uninterrupted
        resume["overhead"] = resume["total_wall_s"] / uninterrupted - 1
    rows[0]["all_outputs_identical"] = all(identical)
    for path in [*outs, volume]:
        shutil.rmtree(path)  # disk: a 1024³ prediction is 4 GiB
    return rows, resumes


def _same_store(a: Path, b: Path) -> bool:
    """Every array of two prediction stores equal, bit for bit (compared slab by slab)."""
    import zarr

    for level in ("0", "labels/mask/0", "1"):
        x, y = zarr.open_array(str(a / level), mode="r"), zarr.open_array(str(b / level), mode="r")
        for z0 in range(0, x.shape[1], SLAB):
            if not np.array_equal(x[:, z0:z0 + SLAB], y[:, z0:z0 + SLAB]):
                return False
    return True


def run(args: argparse.Namespace) -> dict:
    import os

    with tempfile.TemporaryDirectory(prefix="lsmfm_predict_bench_") as tmp:
        root = Path(tmp)
        make_model(root / "model")
        load = os.getloadavg()[0]
        rows, resumes = [], []
        for size in args.sizes:
            r, res = run_size(root, size, args)
            rows += r
            resumes += res
    config = {"sizes": args.sizes, "blocks": args.blocks, "ranks": args.ranks, "overlap": args.overlap,
              "batch": args.batch, "patch": PATCH, "backbone": BACKBONE, "device": args.device,
              "threads": args.threads, "in_memory_up_to": args.in_memory_up_to, "cpu_count": os.cpu_count(),
              "load_average_1min_start": round(load, 2), "load_average_1min_end": round(os.getloadavg()[0], 2)}
    return {"config": config, "rows": rows, "resume": resumes}


def table(result: dict) -> str:
    c = result["config"]
    head = (f"uint16 OME-Zarr (sharded 64³ chunks), UNet {'-'.join(map(str, c['backbone']['channels']))} with "
            f"{c['patch']}³ windows, overlap {c['overlap']}, batch {c['batch']}, {c['device']} "
            f"({c['threads'] or 'default'} threads per rank), {c['cpu_count']} cores, load "
            f"{c['load_average_1min_start']}-{c['load_average_1min_end']}")
    cols = ["volume", "method", "s", "Mvox/s", "Mvox/s/rank", "scaling", "windows", "x 1 pass", "peak MiB/rank",
            "growth/f32", "files/TiB", "max |diff|"]
    lines = [[f"{r['size']}³", r["method"], f"{r['seconds']:.1f}", f"{r['voxels_per_s'] / 1e6:.2f}",
              f"{r.get('voxels_per_s_per_rank', r['voxels_per_s']) / 1e6:.2f}",
              f"{r['scaling_efficiency']:.2f}" if r.get("scaling_efficiency") else "-", str(r["windows"]),
              f"{r['windows_over_one_pass']:.2f}", f"{r['rss_peak_mib']:.0f}", f"{r['growth_over_float32']:.2f}",
              f"{r['files_per_tib_float32']:.0f}" if "files_per_tib_float32" in r else "-",
              f"{r['max_abs_diff_vs_blockwise']:.1e}" if "max_abs_diff_vs_blockwise" in r else "-"]
             for r in result["rows"]]
    widths = [max(len(col), *(len(v[i]) for v in lines)) for i, col in enumerate(cols)]
    rows = ["  ".join(v.rjust(w) for v, w in zip(vals, widths)) for vals in [cols, *lines]]
    for r in result["resume"]:
        rows.append(f"resume, {r['size']}³ on {r['ranks']} ranks: killed (-9) after {r['killed_after_s']:.0f} s "
                    f"with {r['blocks_done_when_killed']}/{r['blocks']} blocks done; the re-run resumed "
                    f"{r['blocks_resumed']} and took {r['rerun_wall_s']:.0f} s; total {r['total_wall_s']:.0f} s "
                    f"vs {r['uninterrupted_wall_s']:.0f} s uninterrupted: overhead {100 * r['overhead']:.0f} %")
    if result["rows"]:
        rows.append(f"all blockwise outputs identical bit for bit: {result['rows'][0]['all_outputs_identical']}")
    return "\n".join([head, *rows])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[512],
                        help="edges of the cubic volumes (512)")
    parser.add_argument("--blocks", type=int, nargs="+", default=[128, 256],
                        help="`lsmfm predict --block` values to measure (128 256)")
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2],
                        help="rank counts of the blockwise runs (torchrun above 1; default 1 2)")
    parser.add_argument("--resume", action="store_true",
                        help="also kill -9 a run at half its blocks and resume it (largest rank count)")
    parser.add_argument("--in-memory-up-to", type=int, default=512,
                        help="run the in-memory baseline for volumes up to this edge (512)")
    parser.add_argument("--overlap", type=float, default=0.25)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads per rank (1, as torchrun sets; 0: torch's default)")
    parser.add_argument("--json", default=None, help="write the result to this JSON file")
    parser.add_argument("--block", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--measure-blockwise", nargs=3, help=argparse.SUPPRESS)
    parser.add_argument("--measure-in-memory", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    common = (args.overlap, args.batch, args.device, args.threads)
    if args.measure_blockwise:
        print(json.dumps(measure_blockwise(*args.measure_blockwise, args.block, *common)))
        return 0
    if args.measure_in_memory:
        model, volume, *compare = args.measure_in_memory
        print(json.dumps(measure_in_memory(model, volume, compare, *common)))
        return 0
    result = run(args)
    print(table(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
