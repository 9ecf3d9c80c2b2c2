"""One training loop for every task and every arm: 3D task models and the 2D baselines alike.

The model says what trains (`Trainable.param_groups`: a 3D task model has the head at `lr` and the
encoder at `lr * encoder_lr_scale`; a 2D baseline its PEFT parameters) and what a phase means
(`Trainable.set_phase`: a frozen 3D encoder is also kept in eval mode, so a linear probe does not move
BatchNorm statistics either). The task says how batches are drawn, the loss and the validation score.
Validation scores the whole val images every `val_every` steps; the best validated weights are restored
at the end, and training stops after `patience` validations without improvement (never during the
head-only phase). A non-finite loss stops the run with the step; `stop()` returning True (a SIGTERM)
ends the run after the current step or validation, marked `interrupted`.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Protocol

import numpy as np
import torch
from torch import nn

from lsmfm.tasks.base import Geometry
from lsmfm.tasks.config import TrainConfig


class Trainable(Protocol):
    """What the loop asks of a model besides its forward."""

    def param_groups(self, cfg: TrainConfig) -> list[dict[str, Any]]:
        """AdamW parameter groups (`params`, `lr`, `name`)."""

    def set_phase(self, frozen: bool) -> None:
        """Enter train mode; `frozen`: the encoder is frozen at this step (staged and linear modes)."""


@dataclass
class TrainResult:
    """How a run ended: steps taken, the step whose weights were kept and their validation score,
    whether it stopped early or was interrupted (then its result is not a finished run), wall time,
    mean time per optimizer step (after the first) and the number of trained parameters."""

    steps: int
    best_step: int
    val_score: float
    stopped_early: bool
    interrupted: bool = False
    seconds: float = 0.0
    sec_per_iter: float = 0.0
    trainable_params: int = 0


def encoder_frozen(cfg: TrainConfig, step: int) -> bool:
    """Whether the encoder is frozen at optimizer step `step` (0-based)."""
    return cfg.mode == "linear" or (cfg.mode == "staged" and step < cfg.head_steps)


class BestWeights:
    """The best validated weights so far (only what training can change: the optimised parameters and
    the buffers, so a frozen 2D foundation model is not copied), and early stopping after `patience`
    validations without improvement (validations up to `grace_steps`, the head-only phase, do not count)."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, patience: int, grace_steps: int
                 ) -> None:
        self.patience, self.grace_steps = patience, grace_steps
        self.score, self.step, self.state, self.bad = -math.inf, 0, None, 0
        trained = {id(p) for group in optimizer.param_groups for p in group["params"]}
        names = {n for n, p in model.named_parameters() if id(p) in trained}
        names |= {n for n, _ in model.named_buffers()}
        self.keys = [k for k in model.state_dict() if k in names]

    def update(self, step: int, score: float, model: nn.Module) -> bool:
        """Record a validation; True when training should stop."""
        if score > self.score:
            self.score, self.step, self.bad = score, step, 0
            state = model.state_dict()
            self.state = {k: state[k].detach().clone() for k in self.keys}
        elif step > self.grace_steps:
            self.bad += 1
        return bool(self.patience) and self.bad >= self.patience

    def restore(self, model: nn.Module) -> None:
        if self.state is not None:
            model.load_state_dict(self.state, strict=False)


def count_trained(optimizer: torch.optim.Optimizer) -> int:
    """Parameters the optimizer updates (each counted once)."""
    seen = {id(p): p for group in optimizer.param_groups for p in group["params"]}
    return sum(p.numel() for p in seen.values())


def train_run(model: Trainable, task: Any, train: list[Any], val: list[Any], cfg: TrainConfig,
              geometry: Geometry, seed: int, log_dir: Path | None = None, desc: str = "finetune",
              progress: bool = True, stop: Callable[[], bool] | None = None) -> TrainResult:
    """Train `model` in place on batches of `train` drawn by `task`; keep the weights with the best
    `task.val_metric` on `val`. `task` provides `batch`, `loss`, `score` and `val_metric` (a
    `FinetuneTask`, or the 2D slice task of `lsmfm.baselines2d.task`). Without `val` (a 2D baseline
    without `data.val_dir`) there is no validation: all `max_steps` run and the last weights are kept
    (`val_score` NaN)."""
    from lsmfm.progress import progress_bar

    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    device = next(model.parameters()).device
    optimizer = torch.optim.AdamW(model.param_groups(cfg), weight_decay=cfg.weight_decay)
    best = BestWeights(model, optimizer, cfg.patience, cfg.head_steps if cfg.mode == "staged" else 0)
    writer = _writer(log_dir)
    bar = progress_bar(total=cfg.max_steps, desc=desc, unit="step", leave=False, enabled=progress)
    stopped, interrupted, step, times, start = False, False, 0, [], time.perf_counter()
    for step in range(1, cfg.max_steps + 1):
        t0 = time.perf_counter()
        frozen = encoder_frozen(cfg, step - 1)
        model.set_phase(frozen)
        x, y = task.batch(train, rng, geometry.patch, cfg.batch_size, cfg.flips)
        loss = task.loss(model(x.to(device)), y.to(device))
        if not torch.isfinite(loss):
            raise FloatingPointError(f"{desc}: loss is {loss.item()} at step {step}; lower train.lr")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
        _log(writer, step, {"train/loss": loss.item(), "train/encoder_frozen": float(frozen)})
        if val and (step % cfg.val_every == 0 or step == cfg.max_steps):
            stopped = _validate(model, task, val, geometry, step, best, writer, bar, loss.item())
        interrupted = stop is not None and stop()
        if stopped or interrupted:
            break
    bar.close()
    if writer is not None:
        writer.close()
    best.restore(model)
    model.eval()
    timed = times[1:] or times
    return TrainResult(steps=step, best_step=best.step if val else step,
                       val_score=best.score if val else math.nan, stopped_early=stopped,
                       interrupted=interrupted, seconds=time.perf_counter() - start,
                       sec_per_iter=float(np.mean(timed)), trainable_params=count_trained(optimizer))


def _validate(model: Any, task: Any, val: list[Any], geometry: Geometry, step: int, best: BestWeights,
              writer: Any, bar: Any, loss: float) -> bool:
    """Score `val`, log it, keep the weights if best; True when early stopping says stop."""
    scores = task.score(model.eval(), val, geometry.window, geometry.overlap)
    value = scores.metrics[task.val_metric]
    _log(writer, step, {f"val/{name}": v for name, v in scores.metrics.items()})
    bar.set_postfix({"loss": f"{loss:.4f}", f"val_{task.val_metric}": f"{value:.3f}"}, refresh=False)
    return best.update(step, value, model)


def _log(writer: Any, step: int, values: dict[str, float]) -> None:
    if writer is not None:
        for name, value in values.items():
            writer.add_scalar(name, value, step)


def _writer(log_dir: Path | None) -> Any:
    if log_dir is None:
        return None
    from lsmfm.training.logging import tensorboard_writer

    return tensorboard_writer(log_dir)
