"""Pretraining cost: seconds per optimizer step and peak memory per backbone, and mask generation speed.

    python benchmarks/pretrain_step.py --json pretrain_step.json

Each backbone is measured in its own subprocess (so its peak RSS is its own) through the real trainer
path: SSLModel (image-only, so the backbone dominates) in a one-process DeepSpeed engine, AdamW,
one teacher update per step. CPU: fp32, 64³, batch 2, paper widths (UNet 32-512, SwinUNETR
feature_size 24). With `--device cuda`: bf16 autocast at 96³ and peak CUDA memory.
Mask generation: `generate_block_mask` (whole batch at once) against `mask_loop_reference`, the
per-block Python loop of the paper's code, same batch, size, block sizes and ratio.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

BACKBONES = {
    "unet": {"arch": "unet", "channels": [32, 64, 128, 256, 512], "strides": [2, 2, 2, 1], "num_res_units": 2,
             "out_channels": 128},
    "swinunetr": {"arch": "swinunetr", "feature_size": 24, "out_channels": 512, "norm": "instance",
                  "use_checkpoint": True},
}


def step_benchmark(arch: str, size: int, batch: int, steps: int, device_name: str) -> dict:
    """Seconds per optimizer step (median of `steps` after one warm-up step; wall and process CPU time)
    and peak memory."""
    from lsmfm.config import from_dict
    from lsmfm.device import resolve_device
    from lsmfm.models.ssl import SSLConfig, SSLModel
    from lsmfm.training import distributed
    from lsmfm.training.pretrain import TrainConfig, build_engine

    torch.manual_seed(0)
    device = resolve_device(device_name, distributed.ensure_env().local_rank)
    env = distributed.init(device)
    model_cfg = from_dict(SSLConfig, {"backbone": BACKBONES[arch], "use_text": False})
    train = TrainConfig(batch_size=batch, zero_stage=0, device=device_name)
    model = SSLModel(model_cfg).to(device)
    engine = build_engine(model, train, env.world_size, device)
    images = torch.rand(batch, 1, size, size, size, device=device)
    times, cpu_times = [], []
    for step in range(steps + 1):
        _sync(device)
        start, cpu_start = time.perf_counter(), time.process_time()
        out = engine(images, None, step, steps + 1)
        engine.backward(out.loss)
        engine.step()
        model.update_teacher(model.teacher_momentum(step, steps + 1))
        _sync(device)
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)
    distributed.shutdown()
    result = {"arch": arch, "size": size, "batch": batch, "device": device.type,
              "precision": "bf16" if device.type == "cuda" else "fp32",
              "params_student_backbone": sum(p.numel() for p in model.student.backbone.parameters()),
              "seconds_per_step": statistics.median(times[1:]), "first_step_s": times[0], "steps": steps,
              "cpu_seconds_per_step": statistics.median(cpu_times[1:]), "threads": torch.get_num_threads()}
    if device.type == "cuda":
        result["peak_memory_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    else:
        # VmHWM, not getrusage: ru_maxrss survives fork and exec, so it may be the parent's peak
        status = Path("/proc/self/status").read_text().splitlines()
        result["peak_rss_mb"] = next(int(s.split()[1]) for s in status if s.startswith("VmHWM:")) / 1024
    return result


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def mask_benchmark(batch: int, size: int, block_sizes: list[int], ratio: float, repeats: int) -> dict:
    """Median time of the batched mask generator and of the per-block loop; their ratio."""
    from lsmfm.models.masking import generate_block_mask, mask_loop_reference

    shape = (size, size, size)

    def timed(fn, seed: int) -> float:
        start = time.perf_counter()
        fn(seed)
        return time.perf_counter() - start

    fast = [timed(lambda s: generate_block_mask(batch, shape, block_sizes, ratio, generator=s), s)
            for s in range(repeats)]
    loop = [timed(lambda s: mask_loop_reference(batch, shape, block_sizes, ratio, seed=s), s)
            for s in range(repeats)]
    t_fast, t_loop = statistics.median(fast), statistics.median(loop)
    return {"mask_batch": batch, "mask_size": size, "mask_block_sizes": block_sizes, "mask_ratio": ratio,
            "mask_vectorized_s": t_fast, "mask_loop_s": t_loop, "mask_speedup_vs_loop": t_loop / t_fast}


def run_in_subprocess(arch: str, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--only", arch, "--size", str(args.size), "--batch", str(args.batch),
           "--steps", str(args.steps), "--device", args.device, "--threads", str(args.threads)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{arch} benchmark failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--size", type=int, default=None, help="patch edge (default 64 on CPU, 96 on GPU)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up step")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--archs", nargs="+", default=list(BACKBONES), choices=list(BACKBONES))
    parser.add_argument("--mask-repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--only", choices=list(BACKBONES), help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.size = args.size or (96 if args.device == "cuda" else 64)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.only:
        print(json.dumps(step_benchmark(args.only, args.size, args.batch, args.steps, args.device)))
        return
    results: dict = {"torch": torch.__version__, "threads": torch.get_num_threads()}
    results.update(mask_benchmark(args.batch, args.size, [8, 16], 0.6, args.mask_repeats))
    print(f"mask: {results['mask_vectorized_s'] * 1e3:.2f} ms batched vs "
          f"{results['mask_loop_s'] * 1e3:.1f} ms loop -> {results['mask_speedup_vs_loop']:.0f}x", flush=True)
    for arch in args.archs:
        r = run_in_subprocess(arch, args)
        results[arch] = r
        mem = r.get("peak_memory_mb", r.get("peak_rss_mb"))
        print(f"{arch}: {r['seconds_per_step']:.2f} s/step, peak {mem:.0f} MB "
              f"({r['device']}, {r['precision']}, {args.size}³, batch {args.batch})", flush=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
