"""The few-shot protocol of `lsmfm baseline2d`: for each (shots, seed), adapt a fresh copy of the model on
`shots` training slices chosen by the seed (lsmfm.tasks.results.fewshot_subset, as `lsmfm finetune`),
score it on the test cases, and record trainable parameters, peak memory and time per iteration.
"""

from __future__ import annotations

import copy
import resource
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from lsmfm.baselines2d.build import build_model, count_parameters, prepare, save_adapted, trainable_state
from lsmfm.baselines2d.config import Baseline2DConfig, Train2DConfig
from lsmfm.baselines2d.data import Case, load_splits, training_slices
from lsmfm.baselines2d.evaluate import METRICS, evaluate
from lsmfm.baselines2d.models.base import Segmenter2D
from lsmfm.config import save_config
from lsmfm.device import resolve_device
from lsmfm.errors import InputError
from lsmfm.io.atomic import atomic_dir
from lsmfm.progress import progress_bar
from lsmfm.tasks.results import fewshot_subset, format_table, plot_metrics, write_results

Slice = tuple[np.ndarray, np.ndarray]


@dataclass
class RunStats:
    steps: int
    sec_per_iter: float



class PeakMemory:
    """Peak memory since `reset()`: CUDA max allocated, or the process's peak RSS (VmHWM, reset on Linux)."""

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


def segmentation_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """BCE + soft Dice on the foreground."""
    prob = torch.sigmoid(logits)
    inter = (prob * target).sum()
    dice = 1 - (2 * inter + 1) / (prob.sum() + target.sum() + 1)
    return F.binary_cross_entropy_with_logits(logits, target) + dice


def augment(image: np.ndarray, label: np.ndarray, rng: np.random.Generator) -> Slice:
    """Random flips and, for square slices, 90-degree rotations."""
    if rng.random() < 0.5:
        image, label = image[:, ::-1], label[:, ::-1]
    if rng.random() < 0.5:
        image, label = image[::-1], label[::-1]
    if image.shape[0] == image.shape[1]:
        k = int(rng.integers(4))
        image, label = np.rot90(image, k), np.rot90(label, k)
    return image, label


def batch_loss(model: Segmenter2D, batch: list[Slice], device: torch.device) -> torch.Tensor:
    """Loss at the slices' own resolution; slices of different sizes go through the model one by one."""
    groups: dict[tuple[int, ...], list[Slice]] = {}
    for item in batch:
        groups.setdefault(item[0].shape, []).append(item)
    total = 0.0
    for items in groups.values():
        x = torch.from_numpy(np.stack([np.ascontiguousarray(i) for i, _ in items])[:, None]).to(device)
        y = torch.from_numpy(np.stack([(lab > 0) for _, lab in items])[:, None].astype(np.float32)).to(device)
        total = total + segmentation_loss(model.logits(x), y) * len(items)
    return total / len(batch)


def train_run(
    model: Segmenter2D,
    pool: list[Slice],
    val: list[Case],
    cfg: Train2DConfig,
    device: torch.device,
    seed: int,
    progress: bool = True,
) -> RunStats:
    """AdamW on the trainable parameters; with validation cases, keep the best weights and stop early.

    Time per iteration is the mean over steps after the first (which pays for lazy initialisation).
    """
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    rng = np.random.default_rng(seed)
    best, best_state, bad, times, step = -1.0, None, 0, [], 0
    bar = progress_bar(range(cfg.max_steps), desc="train", leave=False, enabled=progress)
    for step in bar:
        model.train()
        t0 = time.perf_counter()
        batch = [pool[i] for i in rng.integers(len(pool), size=cfg.batch_size)]
        if cfg.flips:
            batch = [augment(i, lab, rng) for i, lab in batch]
        loss = batch_loss(model, batch, device)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
        bar.set_postfix(loss=f"{loss.item():.4f}")
        if val and (step + 1) % cfg.val_every == 0:
            score = evaluate(model, val, device, cfg.batch_size, cfg.threshold)["dice"]
            if score > best:
                best, best_state, bad = score, trainable_state(model), 0
            else:
                bad += 1
                if cfg.patience and bad >= cfg.patience:
                    break
    if best_state is not None:
        model.load_state_dict(best_state, strict=False)
    timed = times[1:] or times
    return RunStats(step + 1, float(np.mean(timed)))


def run_baseline(
    cfg: Baseline2DConfig, out_dir: str | Path, overwrite: bool = False, progress: bool = True
) -> list[dict[str, Any]]:
    """All (shots, seed) runs; RUN_DIR gets config.yaml, results.csv, metrics.json, plots, predictions/
    and adapted/ (the trainable weights of the largest-shots, first-seed run). RUN_DIR appears only
    when everything succeeded."""
    if Path(out_dir).exists() and not overwrite:
        raise InputError(out_dir, "already exists; choose another --out or pass --overwrite")
    splits = load_splits(cfg.data)
    pool = training_slices(splits.train)
    source = f"{cfg.data.train_dir} (training slices)"
    fewshot_subset(len(pool), max(cfg.shots), cfg.seeds[0], source)
    device = resolve_device(cfg.train.device)
    base = build_model(cfg.model)
    memory = PeakMemory(device)
    rows = []
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        save_config(cfg, tmp / "config.yaml")
        runs = [(s, seed) for s in cfg.shots for seed in cfg.seeds]
        for shots, seed in progress_bar(runs, desc=f"{cfg.model.name}+{cfg.peft.method}", unit="run",
                                        enabled=progress):
            subset = [pool[i] for i in fewshot_subset(len(pool), shots, seed, source)]
            torch.manual_seed(seed)
            memory.reset()
            model = prepare(copy.deepcopy(base).to(device), cfg.peft).to(device)
            stats = train_run(model, subset, splits.val, cfg.train, device, seed, progress)
            pred_dir = tmp / "predictions" / f"shots{shots}_seed{seed}" if cfg.save_predictions else None
            scores = evaluate(model, splits.test, device, cfg.train.batch_size, cfg.train.threshold, pred_dir)
            peak = memory.peak_mb()
            trainable, total = count_parameters(model)
            rows.append(
                {
                    "shots": shots,
                    "seed": seed,
                    "init": cfg.init,
                    **scores,
                    "model": cfg.model.name,
                    "method": cfg.peft.method,
                    "trainable_params": trainable,
                    "total_params": total,
                    "peak_memory_mb": round(peak, 1),
                    "sec_per_iter": round(stats.sec_per_iter, 4),
                    "steps": stats.steps,
                }
            )
            if (shots, seed) == (max(cfg.shots), cfg.seeds[0]):
                save_adapted(model, cfg, tmp / "adapted")
            del model
        write_results(tmp, rows, METRICS)
        plot_metrics(tmp, rows, METRICS, title=f"{cfg.model.name} + {cfg.peft.method}")
    if progress:
        print(format_table(rows, METRICS))
    return rows
