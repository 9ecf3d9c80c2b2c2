"""One training loop for every task: linear probe, staged unfreezing or full finetuning, early stopping.

AdamW with two parameter groups (head at `lr`, encoder at `lr * encoder_lr_scale`). A frozen encoder is
also kept in eval mode, so a linear probe does not move BatchNorm statistics either. Validation scores
the whole val images every `val_every` steps; the best validated weights are restored at the end, and
training stops after `patience` validations without improvement (never during the head-only phase).
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from lsmfm.tasks.base import Example, FinetuneTask, Geometry
from lsmfm.tasks.config import TrainConfig


@dataclass
class TrainResult:
    """How a run ended: steps taken, the step whose weights were kept, and their validation score."""

    steps: int
    best_step: int
    val_score: float
    stopped_early: bool


def encoder_frozen(cfg: TrainConfig, step: int) -> bool:
    """Whether the encoder is frozen at optimizer step `step` (0-based)."""
    return cfg.mode == "linear" or (cfg.mode == "staged" and step < cfg.head_steps)


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW: the head at lr, the encoder at lr * encoder_lr_scale (absent in linear mode)."""
    groups = [{"params": list(model.head.parameters()), "lr": cfg.lr, "name": "head"}]
    if cfg.mode != "linear" and cfg.encoder_lr_scale > 0:
        groups.append({"params": list(model.backbone.parameters()), "lr": cfg.lr * cfg.encoder_lr_scale,
                       "name": "encoder"})
    return torch.optim.AdamW(groups, weight_decay=cfg.weight_decay)


def set_phase(model: nn.Module, frozen: bool) -> None:
    """Train mode for the head; the encoder trains only when not frozen."""
    model.train()
    model.backbone.requires_grad_(not frozen)
    if frozen:
        model.backbone.eval()


class BestWeights:
    """The best validated weights so far, and early stopping after `patience` validations without
    improvement (validations up to `grace_steps`, the head-only phase, do not count)."""

    def __init__(self, patience: int, grace_steps: int) -> None:
        self.patience, self.grace_steps = patience, grace_steps
        self.score, self.step, self.state, self.bad = -math.inf, 0, None, 0

    def update(self, step: int, score: float, model: nn.Module) -> bool:
        """Record a validation; True when training should stop."""
        if score > self.score:
            self.score, self.step, self.bad = score, step, 0
            self.state = copy.deepcopy(model.state_dict())
        elif step > self.grace_steps:
            self.bad += 1
        return bool(self.patience) and self.bad >= self.patience


def train_run(model: nn.Module, task: FinetuneTask, train: list[Example], val: list[Example],
              cfg: TrainConfig, geometry: Geometry, seed: int, log_dir: Path | None = None,
              desc: str = "finetune", progress: bool = True) -> TrainResult:
    """Train `model` in place on crops of `train`; keep the weights with the best score on `val`."""
    from lsmfm.progress import progress_bar

    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    device = next(model.parameters()).device
    optimizer = make_optimizer(model, cfg)
    best = BestWeights(cfg.patience, cfg.head_steps if cfg.mode == "staged" else 0)
    writer = _writer(log_dir)
    bar = progress_bar(total=cfg.max_steps, desc=desc, unit="step", leave=False, enabled=progress)
    stopped, step = False, 0
    for step in range(1, cfg.max_steps + 1):
        frozen = encoder_frozen(cfg, step - 1)
        set_phase(model, frozen)
        x, y = task.batch(train, rng, geometry.patch, cfg.batch_size, cfg.flips)
        loss = task.loss(model(x.to(device)), y.to(device))
        if not torch.isfinite(loss):
            raise FloatingPointError(f"{desc}: loss is {loss.item()} at step {step}; lower train.lr")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
        _log(writer, step, {"train/loss": loss.item(), "train/encoder_frozen": float(frozen)})
        if step % cfg.val_every and step != cfg.max_steps:
            continue
        scores = task.score(model.eval(), val, geometry.window, geometry.overlap)
        value = scores.metrics[task.val_metric]
        _log(writer, step, {f"val/{name}": v for name, v in scores.metrics.items()})
        postfix = {"loss": f"{loss.item():.4f}", f"val_{task.val_metric}": f"{value:.3f}"}
        bar.set_postfix(postfix, refresh=False)
        stopped = best.update(step, value, model)
        if stopped:
            break
    bar.close()
    if writer is not None:
        writer.close()
    if best.state is not None:
        model.load_state_dict(best.state)
    model.eval()
    return TrainResult(steps=step, best_step=best.step, val_score=best.score, stopped_early=stopped)


def _log(writer, step: int, values: dict[str, float]) -> None:
    if writer is not None:
        for name, value in values.items():
            writer.add_scalar(name, value, step)


def _writer(log_dir: Path | None):
    if log_dir is None:
        return None
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(str(log_dir))
