"""One pretraining step of lsmfm beside the paper's step and a bare backbone, and mask generation.

    python benchmarks/pretrain_step.py --threads 1 --rounds 3 \
        --json benchmarks/results/pretrain_step_cpu.json [--before-src DIR] [--readme README.md]
    python benchmarks/pretrain_step.py --from-json benchmarks/results/pretrain_step_cpu.json \
        --readme README.md

Per backbone (same network, batch, patch size and threads for every variant):
- `bare`: the student backbone's forward and backward alone (a mean of its output as the loss);
- `paper`: the paper's step re-implemented (`benchmarks/paper_step.py`: student on the masked patch,
  teacher on the full patch, softmax-KL over all masked voxels of channel-normalised features, L1 through
  its light decoder, per-parameter EMA, AdamW);
- `lsmfm`: the trainer's real optimizer step (`Trainer._optimizer_step`: DeepSpeed engine, heads, losses,
  AdamW, EMA, the per-step loss record), on a batch held in memory;
- `lsmfm_before` (with `--before-src`): the same trainer step imported from another checkout (the
  commit before a change), for the before/after table.
Image-only (`use_text: false`, so the backbone dominates), CPU: fp32, 64³, batch 2; `--device cuda`:
bf16 autocast. Each variant runs in its own process (its peak memory is its own); the variants take
turns for `--rounds` rounds so load from other jobs falls on all of them; each reports the median of its
timed steps after one warm-up step. Ratios use process CPU time on CPU (steadier on a shared machine)
and wall time on GPU: `step_ratio_vs_paper` = lsmfm / paper, `ssl_step_over_bare` = lsmfm / bare.
Mask generation: lsmfm's batched masks against the paper's `generate_patch_mask` loop at the paper's
settings (64³, ratio 0.3, one block size of 8 or 16 per sample: `masking.size_choice: sample`) =
`mask_speedup_vs_paper`, and at lsmfm's defaults (ratio 0.6, mixed sizes).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

BACKBONES = {
    "unet": {"arch": "unet", "channels": [32, 64, 128, 256, 512], "strides": [2, 2, 2, 1], "num_res_units": 2,
             "out_channels": 128},
    "swinunetr": {"arch": "swinunetr", "feature_size": 24, "out_channels": 512, "norm": "instance",
                  "use_checkpoint": True},
}
TINY = {  # --tiny: the same code paths at test size
    "unet": {"arch": "unet", "channels": [8, 16, 32], "strides": [2, 2], "num_res_units": 1,
             "out_channels": 16},
    "swinunetr": {"arch": "swinunetr", "feature_size": 12, "out_channels": 16, "norm": "instance",
                  "use_checkpoint": True},
}
VARIANTS = ("bare", "paper", "lsmfm")
README_BEGIN, README_END = "<!-- pretrain_step:begin -->", "<!-- pretrain_step:end -->"


# ---- one variant, measured in its own process ------------------------------------------------------------
def backbone_config(arch: str, tiny: bool) -> dict:
    return dict((TINY if tiny else BACKBONES)[arch])


def bare_step(arch: str, tiny: bool, device: torch.device) -> tuple[Callable[[torch.Tensor], None], int]:
    """Forward + backward of the backbone alone."""
    from lsmfm.config import from_dict
    from lsmfm.models.backbones.registry import BackboneConfig, build_backbone

    net = build_backbone(from_dict(BackboneConfig, backbone_config(arch, tiny))).to(device)

    def step(images: torch.Tensor) -> None:
        net.zero_grad(set_to_none=True)
        with _autocast(device):
            out = net(images)
        out.float().mean().backward()

    return step, _count(net)


def paper_step(arch: str, tiny: bool, device: torch.device) -> tuple[Callable[[torch.Tensor], None], int]:
    """The paper's `shared_step` + AdamW step + `on_train_batch_end` EMA (benchmarks/paper_step.py)."""
    from paper_step import build_paper_step

    from lsmfm.config import from_dict
    from lsmfm.models.backbones.registry import BackboneConfig, build_backbone

    cfg = backbone_config(arch, tiny)
    student = build_backbone(from_dict(BackboneConfig, cfg))
    teacher = None
    if arch == "swinunetr":  # the paper's teacher: use_checkpoint=False
        teacher = build_backbone(from_dict(BackboneConfig, {**cfg, "use_checkpoint": False}))
    module = build_paper_step(student, cfg["out_channels"], arch, teacher=teacher).to(device)
    optimizer = module.optimizer()

    def step(images: torch.Tensor) -> None:
        optimizer.zero_grad(set_to_none=True)
        with _autocast(device):
            loss = module.loss(images)
        loss.backward()
        optimizer.step()
        module.update_teacher()

    return step, _count(module.student_encoder)


def lsmfm_step(arch: str, tiny: bool, device: torch.device, batch: int,
               size: int) -> tuple[Callable[[torch.Tensor], None], int]:
    """The trainer's `_optimizer_step` on a batch held in memory (works on older checkouts too)."""
    from lsmfm.config import from_dict
    from lsmfm.training import distributed
    from lsmfm.training.pretrain import PretrainConfig, Trainer

    cfg = from_dict(PretrainConfig, {
        "data": {"catalogs": ["unused.yaml"], "patch_size": [size] * 3},
        "model": {"backbone": backbone_config(arch, tiny), "use_text": False},
        "train": {"batch_size": batch, "zero_stage": 0, "device": device.type, "max_steps": 10**6,
                  "log_every": 10, "image_every": 0, "seed": 0}})
    held: dict[str, Any] = {"run_dir": tempfile.TemporaryDirectory(prefix="lsmfm_step_")}
    trainer = Trainer(cfg, Path(held["run_dir"].name), distributed.ensure_env(), device, resume=False,
                      progress=False)

    def batches() -> Iterator[dict[str, Any]]:
        while True:
            yield {"image": held["images"], "text": [""] * batch}

    stream = batches()

    def step(images: torch.Tensor) -> None:
        held["images"] = images
        trainer._optimizer_step(stream)

    return step, _count(trainer.model.student.backbone)


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _autocast(device: torch.device) -> Any:
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(variant: str, args: argparse.Namespace) -> dict:
    """Warm-up step, then `args.steps` timed steps (wall and process CPU time), FLOPs and peak memory."""
    from lsmfm.device import resolve_device
    from lsmfm.training import distributed

    torch.manual_seed(0)
    device = resolve_device(args.device, distributed.ensure_env().local_rank)
    distributed.init(device)
    build = {"bare": bare_step, "paper": paper_step}.get(variant)
    if build is not None:
        step, params = build(args.arch, args.tiny, device)
    else:
        step, params = lsmfm_step(args.arch, args.tiny, device, args.batch, args.size)
    images = torch.rand(args.batch, 1, args.size, args.size, args.size, device=device)
    times, cpu_times = [], []
    for _ in range(args.steps + 1):
        _sync(device)
        start, cpu_start = time.perf_counter(), time.process_time()
        step(images)
        _sync(device)
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)
    flops = count_flops(step, images)
    import lsmfm

    result = {"variant": variant, "arch": args.arch, "params_backbone": params, "seconds": times[1:],
              "cpu_seconds": cpu_times[1:], "first_step_s": times[0], "flops_per_step": flops,
              "threads": torch.get_num_threads(), "lsmfm_path": str(Path(lsmfm.__file__).parent)}
    result.update(peak_memory(device))
    distributed.shutdown()
    return result


def count_flops(step: Callable[[torch.Tensor], None], images: torch.Tensor) -> float:
    """FLOPs of one more step, counted by torch's FlopCounterMode (convolutions and matmuls)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        step(images)
    return float(counter.get_total_flops())


def peak_memory(device: torch.device) -> dict:
    if device.type == "cuda":
        return {"peak_memory_mb": torch.cuda.max_memory_allocated(device) / 2**20}
    # VmHWM, not getrusage: ru_maxrss survives fork and exec, so it may be the parent's peak
    status = Path("/proc/self/status").read_text().splitlines()
    return {"peak_rss_mb": next(int(s.split()[1]) for s in status if s.startswith("VmHWM:")) / 1024}


# ---- mask generation -------------------------------------------------------------------------------------
def mask_benchmark(batch: int, size: int, repeats: int, device: torch.device) -> dict:
    """Median time of lsmfm's batched masks and of the paper's loop: at the paper's settings (ratio 0.3,
    one block size per sample: lsmfm's `size_choice: sample`) and at lsmfm's (ratio 0.6, mixed sizes)."""
    from paper_step import paper_patch_mask

    from lsmfm.models.masking import MaskConfig, block_mask

    images = torch.zeros(batch, 1, size, size, size, device=device)
    rows = {}
    for name, ratio, choice in (("paper_settings", 0.3, "sample"), ("lsmfm_settings", 0.6, "region")):
        cfg = MaskConfig(block_sizes=[8, 16], size_choice=choice)

        def lsmfm_mask(seed: int) -> None:
            block_mask(cfg, batch, (size,) * 3, ratio, generator=seed, device=device)

        def paper_mask(seed: int) -> None:
            torch.manual_seed(seed)
            paper_patch_mask(images, 8, ratio)

        lsmfm_mask(repeats)  # warm-up
        paper_mask(repeats)
        t_lsmfm = statistics.median(_timed(lsmfm_mask, s, device) for s in range(repeats))
        t_paper = statistics.median(_timed(paper_mask, s, device) for s in range(repeats))
        rows[name] = {"ratio": ratio, "size_choice": choice, "lsmfm_ms": t_lsmfm * 1e3,
                      "paper_ms": t_paper * 1e3, "speedup": t_paper / t_lsmfm}
    return {"batch": batch, "size": size, "block_sizes": [8, 16], "repeats": repeats, **rows}


def _timed(fn: Callable[[int], None], seed: int, device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    fn(seed)
    _sync(device)
    return time.perf_counter() - start


def device_peak_tflops(device: str) -> float | None:
    """The GPU's dense bf16 peak (lsmfm's table), None on CPU or for an unknown GPU."""
    from lsmfm.training.throughput import peak_tflops

    return peak_tflops(torch.device(device))


# ---- the driver ------------------------------------------------------------------------------------------
def run_variant(variant: str, arch: str, args: argparse.Namespace) -> dict:
    """One variant in a fresh process; `lsmfm_before` imports lsmfm from --before-src."""
    cmd = [sys.executable, __file__, "--measure", variant.removesuffix("_before"), "--arch", arch,
           "--size", str(args.size), "--batch", str(args.batch), "--steps", str(args.steps),
           "--device", args.device, "--threads", str(args.threads)] + (["--tiny"] if args.tiny else [])
    env = dict(os.environ)
    if variant.endswith("_before"):
        env["PYTHONPATH"] = os.pathsep.join([str(args.before_src), env.get("PYTHONPATH", "")])
    done = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"{variant} {arch} failed:\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    if variant.endswith("_before") and Path(result["lsmfm_path"]).parent != args.before_src.resolve():
        raise RuntimeError(f"lsmfm_before imported {result['lsmfm_path']}, not {args.before_src}")
    return result


def summarise(runs: list[dict], basis: str) -> dict:
    """Medians over every timed step of every round, the spread of the round medians."""
    first = runs[0]
    out = {k: first[k] for k in ("arch", "params_backbone", "threads", "flops_per_step", "lsmfm_path")}
    for key in ("seconds", "cpu_seconds"):
        values = [v for r in runs for v in r[key]]
        out[f"{key}_per_step"] = statistics.median(values)
        out[f"{key}_round_medians"] = [statistics.median(r[key]) for r in runs]
    mem = "peak_memory_mb" if "peak_memory_mb" in first else "peak_rss_mb"
    out[mem] = max(r[mem] for r in runs)
    out["tflops_per_s"] = first["flops_per_step"] / out["seconds_per_step"] / 1e12
    out["basis_s"] = out[basis]
    return out


def run_all(args: argparse.Namespace) -> dict:
    basis = "seconds_per_step" if args.device == "cuda" else "cpu_seconds_per_step"
    variants = list(args.variants) + (["lsmfm_before"] if args.before_src else [])
    results: dict[str, Any] = {
        "torch": torch.__version__, "threads": args.threads or torch.get_num_threads(), "device": args.device,
        "precision": "bf16" if args.device == "cuda" else "fp32", "size": args.size, "batch": args.batch,
        "steps": args.steps, "rounds": args.rounds, "ratio_basis": basis, "tiny": args.tiny,
        "load_average_start": os.getloadavg()[0], "cpu_count": os.cpu_count(),
        "gpu": torch.cuda.get_device_name() if args.device == "cuda" else None}
    results["mask"] = mask_benchmark(args.batch, 64, args.mask_repeats, torch.device(args.device))
    results["mask_speedup_vs_paper"] = results["mask"]["paper_settings"]["speedup"]
    print(f"mask, paper settings: {results['mask']['paper_settings']['lsmfm_ms']:.2f} ms lsmfm vs "
          f"{results['mask']['paper_settings']['paper_ms']:.1f} ms paper -> "
          f"{results['mask_speedup_vs_paper']:.0f}x", flush=True)
    raw: dict[str, dict[str, list[dict]]] = {a: {v: [] for v in variants} for a in args.archs}
    for round_ in range(args.rounds):
        for arch in args.archs:
            for variant in variants:
                r = run_variant(variant, arch, args)
                raw[arch][variant].append(r)
                print(f"round {round_ + 1} {arch} {variant}: {statistics.median(r['seconds']):.2f} s/step "
                      f"(CPU {statistics.median(r['cpu_seconds']):.2f} s)", flush=True)
    peak = device_peak_tflops(args.device)
    for arch in args.archs:
        rows = {v: summarise(raw[arch][v], basis) for v in variants}
        for row in rows.values():
            if peak:
                row["mfu"] = row["tflops_per_s"] / peak
        for key, num, den in (("step_ratio_vs_paper", "lsmfm", "paper"),
                              ("ssl_step_over_bare", "lsmfm", "bare"),
                              ("after_over_before", "lsmfm", "lsmfm_before")):
            if num in rows and den in rows:
                rows[key] = rows[num]["basis_s"] / rows[den]["basis_s"]
        results[arch] = rows
    for key in ("step_ratio_vs_paper", "ssl_step_over_bare"):
        if all(key in results[a] for a in args.archs):
            results[key] = {a: results[a][key] for a in args.archs}
    results["load_average_end"] = os.getloadavg()[0]
    return results


# ---- the README block ------------------------------------------------------------------------------------
NAMES = {"unet": "UNet 32-512", "swinunetr": "SwinUNETR feature_size 24 (checkpointing)"}


def readme_block(r: dict) -> str:
    """The README tables, written from the results JSON only."""
    unit = "CPU s" if r["ratio_basis"] == "cpu_seconds_per_step" else "s"
    archs = [a for a in NAMES if a in r]
    names = {a: f"{NAMES[a]}{' (tiny widths)' if r['tiny'] else ''}" for a in archs}
    lines = [README_BEGIN,
             f"Written by `benchmarks/pretrain_step.py --readme` from `{r.get('json', 'the results JSON')}` "
             f"({r['device']}, {r['precision']}, {r['size']}³, batch {r['batch']}, "
             f"{r['threads']} thread(s), "
             f"{r['rounds']} rounds × {r['steps']} timed steps, medians; load average "
             f"{r['load_average_start']:.1f} → {r['load_average_end']:.1f} on {r['cpu_count']} cores).",
             "", f"| backbone | bare fwd+bwd ({unit}) | paper's step ({unit}) | lsmfm step ({unit}) | "
                 "`step_ratio_vs_paper` | `ssl_step_over_bare` | lsmfm peak memory |",
             "|---|---|---|---|---|---|---|"]
    mem = "peak_memory_mb" if r["device"] == "cuda" else "peak_rss_mb"
    for a in archs:
        x = r[a]
        lines.append(f"| {names[a]} | {x['bare']['basis_s']:.2f} | {x['paper']['basis_s']:.2f} | "
                     f"{x['lsmfm']['basis_s']:.2f} | {x['step_ratio_vs_paper']:.2f} | "
                     f"{x['ssl_step_over_bare']:.2f} | {x['lsmfm'][mem] / 1024:.1f} GB |")
    if all("lsmfm_before" in r[a] for a in archs):
        lines += ["", f"| backbone | before ({unit}) | after ({unit}) | after / before | before wall s | "
                      "after wall s |", "|---|---|---|---|---|---|"]
        for a in archs:
            b, n = r[a]["lsmfm_before"], r[a]["lsmfm"]
            lines.append(f"| {names[a]} | {b['basis_s']:.2f} | {n['basis_s']:.2f} | "
                         f"{r[a]['after_over_before']:.3f} | {b['seconds_per_step']:.2f} | "
                         f"{n['seconds_per_step']:.2f} |")
    m = r["mask"]
    lines += ["", f"| mask generation ({m['batch']} × {m['size']}³, blocks 8/16) | lsmfm (ms) | "
                  "paper's loop (ms) | speed-up |", "|---|---|---|---|"]
    for key, label in (("paper_settings", "paper's settings: ratio 0.3, one size per sample"),
                       ("lsmfm_settings", "lsmfm's defaults: ratio 0.6, mixed sizes")):
        lines.append(f"| {label} | {m[key]['lsmfm_ms']:.2f} | {m[key]['paper_ms']:.1f} | "
                     f"{m[key]['speedup']:.0f}× |")
    return "\n".join(lines + [README_END])


def write_readme(readme: Path, results: dict) -> None:
    text = readme.read_text()
    if README_BEGIN not in text or README_END not in text:
        raise SystemExit(f"{readme}: no {README_BEGIN} ... {README_END} block to rewrite")
    head, rest = text.split(README_BEGIN, 1)
    tail = rest.split(README_END, 1)[1]
    readme.write_text(head + readme_block(results) + tail)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--readme", type=Path, help="rewrite this README's marked block from the results")
    parser.add_argument("--from-json", type=Path, help="measure nothing: the results are this file")
    parser.add_argument("--size", type=int, default=64, help="patch edge (default 64)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up step")
    parser.add_argument("--rounds", type=int, default=1, help="turns each variant takes")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--archs", nargs="+", default=list(BACKBONES), choices=list(BACKBONES))
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS),
                        help="what to measure (the README tables need all three)")
    parser.add_argument("--before-src", type=Path, help="a checkout whose trainer step is `lsmfm_before`")
    parser.add_argument("--mask-repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--tiny", action="store_true", help="tiny widths (tests)")
    parser.add_argument("--measure", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--arch", choices=list(BACKBONES), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.measure:
        print(json.dumps(measure(args.measure, args)))
        return
    if args.from_json:
        results = json.loads(args.from_json.read_text())
    else:
        results = run_all(args)
        if args.json:
            results["json"] = str(args.json)
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(results, indent=1) + "\n")
    if "step_ratio_vs_paper" not in results:  # a subset of the variants: no README tables
        if args.readme:
            raise SystemExit("--readme needs every variant (bare, paper, lsmfm)")
        return
    print(readme_block(results))
    if args.readme:
        write_readme(args.readme, results)


if __name__ == "__main__":
    main()
