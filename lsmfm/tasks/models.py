"""Task models: a pretrained (or scratch) backbone plus a small task head, saved like pretrained weights.

    segment   dense features -> 1x1x1 conv -> logits (B, out_channels, D, H, W)
    classify  pooled features (`backbone.embed`) -> linear or MLP -> logits (B, n_classes)
    deblur    dense features -> 1x1x1 conv -> residual added to the input (B, C, D, H, W); the conv starts
              at zero, so an untrained model returns its input and training learns only the correction

A finetuned model is a model folder in the weights format (`lsmfm.weights.format`): state dict keys
`backbone.*` (exactly the backbone's own keys, so the backbone half loads anywhere a pretrained backbone
does) and `head.*`, and `config.task = {"name", "head", "classes", "threshold"}`, so the folder alone
rebuilds the model for `lsmfm predict`.

Example:
    >>> model = build_task_model("segment", build_backbone(BackboneConfig(channels=[8, 16, 32],
    ...                          strides=[2, 2], out_channels=8)))
    >>> save_task_model(model, "runs/seg_model", model_config)
    >>> model, config = load_task_model("runs/seg_model")
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence

import torch
from torch import nn

from lsmfm.config import from_dict, to_dict
from lsmfm.errors import ConfigError, InputError

TASKS = ("segment", "classify", "deblur")


@dataclass
class HeadConfig:
    """The head's architecture; stored in the model folder as `config.task["head"]`.

    Args:
        out_channels: segment: logit channels (1 for binary segmentation).
        residual: deblur: add the head's output to the input (residual prediction).
        kind: classify: "linear" or "mlp" (one hidden layer, GELU) on the pooled features.
        n_classes: classify: number of classes.
        hidden: classify: width of the MLP's hidden layer.
        dropout: classify: dropout before the last layer.
    """

    out_channels: int = 1
    residual: bool = True
    kind: Literal["linear", "mlp"] = "linear"
    n_classes: int = 2
    hidden: int = 128
    dropout: float = 0.0

    def __post_init__(self) -> None:
        if min(self.out_channels, self.hidden) < 1 or self.n_classes < 2:
            raise ValueError(f"head needs out_channels >= 1, hidden >= 1 and n_classes >= 2, got {self}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"head dropout must be in [0, 1), got {self.dropout}")


class TaskModel(nn.Module):
    """`backbone` + `head` for one task; `forward` returns what the task's loss and metrics expect."""

    def __init__(self, task: str, backbone: nn.Module, head: nn.Module, head_config: HeadConfig) -> None:
        super().__init__()
        if task not in TASKS:
            raise ConfigError(f"unknown task {task!r}; expected one of {', '.join(TASKS)}")
        self.task = task
        self.backbone = backbone
        self.head = head
        self.head_config = head_config

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.task == "classify":
            return self.head(self.backbone.embed(x))
        out = self.head(self.backbone(x))
        if self.task == "deblur" and self.head_config.residual:
            return x + out
        return out


def _head_config(head_cfg: HeadConfig | Mapping[str, Any] | None) -> HeadConfig:
    if head_cfg is None:
        return HeadConfig()
    if isinstance(head_cfg, HeadConfig):
        return head_cfg
    return from_dict(HeadConfig, dict(head_cfg), source="head config")


def build_head(task: str, feature_dim: int, in_channels: int, cfg: HeadConfig) -> nn.Module:
    """The head module of `task` for a backbone with `feature_dim` features and `in_channels` inputs."""
    if task == "segment":
        return nn.Conv3d(feature_dim, cfg.out_channels, kernel_size=1)
    if task == "deblur":
        head = nn.Conv3d(feature_dim, in_channels, kernel_size=1)
        nn.init.zeros_(head.weight)
        nn.init.zeros_(head.bias)
        return head
    if task == "classify":
        if cfg.kind == "linear":
            return nn.Sequential(nn.Dropout(cfg.dropout), nn.Linear(feature_dim, cfg.n_classes))
        return nn.Sequential(nn.Linear(feature_dim, cfg.hidden), nn.GELU(), nn.Dropout(cfg.dropout),
                             nn.Linear(cfg.hidden, cfg.n_classes))
    raise ConfigError(f"unknown task {task!r}; expected one of {', '.join(TASKS)}")


def build_task_model(task: str, backbone: nn.Module, head_cfg: HeadConfig | Mapping[str, Any] | None = None
                     ) -> TaskModel:
    """Wrap `backbone` (from `build_backbone` or `load_pretrained`) with a fresh head for `task`."""
    cfg = _head_config(head_cfg)
    head = build_head(task, backbone.config.out_channels, backbone.config.in_channels, cfg)
    return TaskModel(task, backbone, head, cfg)


def save_task_model(model: TaskModel, out_dir: str | Path, model_config: Any,
                    class_names: Sequence[str] | None = None, threshold: float = 0.5,
                    model_card: str | None = None, overwrite: bool = False) -> Path:
    """Save `model` as a model folder (atomically); `model_config` (a `ModelConfig`, e.g. the pretrained
    backbone's `.lsmfm_config`) supplies patch size, voxel size, normalisation and pretraining provenance;
    its backbone and task entries are filled in here."""
    from lsmfm.weights.format import save_model_dir

    classes = [str(c) for c in class_names or []]
    if model.task == "classify" and len(classes) != model.head_config.n_classes:
        raise ValueError(f"classify model has {model.head_config.n_classes} classes but {len(classes)} "
                         f"class names were given: {classes}")
    task = {"name": model.task, "head": to_dict(model.head_config), "classes": classes,
            "threshold": float(threshold)}
    config = dataclasses.replace(model_config, backbone=model.backbone.config, task=task)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    if model_card is None:
        model_card = task_model_card(config, state)
    return save_model_dir(out_dir, state, config, model_card=model_card, overwrite=overwrite)


def task_model_card(config: Any, state: Mapping[str, torch.Tensor]) -> str:
    """The weights format's model card plus the task's classes, threshold and how to predict."""
    from lsmfm.weights.card import render_model_card

    task = config.task
    lines = [render_model_card(config, state, title=f"lsmfm finetuned {task['name']} model").rstrip("\n"), ""]
    if task["classes"]:
        lines.append(f"Classes (logit order): {', '.join(task['classes'])}")
    if task["name"] == "segment":
        lines.append(f"Mask threshold on the foreground probability: {task['threshold']}")
    lines += ["", "## Use", "", "```python", "from lsmfm.tasks.models import load_task_model",
              'model, config = load_task_model("path/to/this/folder")', "```", ""]
    if task["name"] != "classify":
        lines += ["Whole volumes: `lsmfm predict --model path/to/this/folder --input VOLUME "
                  "--out PRED.zarr`", ""]
    return "\n".join(lines)


def load_task_model(path: str | Path, device: str | torch.device = "cpu") -> tuple[TaskModel, Any]:
    """Rebuild a finetuned model from its folder, in eval mode: (TaskModel, ModelConfig)."""
    from lsmfm.models.backbones import build_backbone
    from lsmfm.weights.format import read_model_dir

    config, state = read_model_dir(path)
    task = config.task
    if not task:
        raise InputError(path, "holds a pretrained backbone without a task head; finetune it first "
                               "(`lsmfm finetune segment|classify|deblur`)")
    if task.get("name") not in TASKS:
        raise InputError(path, f"config task name {task.get('name')!r} is not one of {', '.join(TASKS)}")
    try:
        model = build_task_model(task["name"], build_backbone(config.backbone), task.get("head"))
    except ConfigError as exc:
        raise InputError(path, f"invalid task head in config: {exc}") from exc
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise InputError(path, f"weights do not match the configured {task['name']} model: {exc}") from exc
    return model.to(device).eval(), config
