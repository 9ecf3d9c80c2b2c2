"""Task models: a pretrained (or scratch) backbone plus the task's head, saved like pretrained weights.

What the head is and how it reads the backbone belongs to the task (`FinetuneTask.build_head`,
`FinetuneTask.forward`; see `lsmfm.tasks.registry`), e.g. segment: dense features -> 1x1x1 conv ->
logits; classify: pooled features -> linear or MLP -> logits; deblur: a zero-initialised 1x1x1 conv
whose output is added to the input.

A finetuned model is a model folder in the weights format (`lsmfm.weights.format`): state dict keys
`backbone.*` (exactly the backbone's own keys, so the backbone half loads anywhere a pretrained backbone
does) and `head.*`, and `config.task = {"name", "head", "classes", "threshold"}`, so the folder alone
rebuilds the model for `lsmfm predict`.

Example:
    >>> model = build_task_model("segment", UNetConfig(channels=[8, 16, 32], strides=[2, 2],
    ...                          out_channels=8).build())
    >>> save_task_model(model, "runs/seg_model", model_config)
    >>> model, config = load_task_model("runs/seg_model")
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import torch
from torch import nn

from lsmfm.config import to_dict
from lsmfm.errors import ConfigError, InputError
from lsmfm.tasks.registry import task_class

if TYPE_CHECKING:
    from lsmfm.tasks.config import TrainConfig


class TaskModel(nn.Module):
    """`backbone` + `head` for one task; `forward` is the task's (what its loss and metrics expect)."""

    def __init__(self, task: str, backbone: nn.Module, head: nn.Module, head_config: Any) -> None:
        super().__init__()
        self.spec = task_class(task)
        self.task = task
        self.backbone = backbone
        self.head = head
        self.head_config = head_config

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.spec.forward(self.backbone, self.head, self.head_config, x)

    def param_groups(self, cfg: TrainConfig) -> list[dict[str, Any]]:
        """AdamW groups of the training loop: the head at lr, the encoder at lr * encoder_lr_scale
        (absent in linear mode)."""
        groups = [{"params": list(self.head.parameters()), "lr": cfg.lr, "name": "head"}]
        if cfg.mode != "linear" and cfg.encoder_lr_scale > 0:
            groups.append({"params": list(self.backbone.parameters()), "lr": cfg.lr * cfg.encoder_lr_scale,
                           "name": "encoder"})
        return groups

    def set_phase(self, frozen: bool) -> None:
        """Train mode for the head; the encoder trains only when not frozen (then also in eval mode,
        so its BatchNorm statistics stay as they are)."""
        self.train()
        self.backbone.requires_grad_(not frozen)
        if frozen:
            self.backbone.eval()


def build_task_model(task: str, backbone: nn.Module, head_cfg: Any = None) -> TaskModel:
    """Wrap `backbone` (from `build_backbone` or `load_pretrained`) with a fresh head for `task`;
    `head_cfg`: the task's head config, a mapping of its fields, or None for its defaults."""
    spec = task_class(task)
    cfg = spec.read_head(head_cfg)
    head = spec.build_head(backbone.config.out_channels, backbone.config.in_channels, cfg)
    return TaskModel(task, backbone, head, cfg)


def save_task_model(model: TaskModel, out_dir: str | Path, model_config: Any,
                    class_names: Sequence[str] | None = None, threshold: float = 0.5,
                    model_card: str | None = None, overwrite: bool = False,
                    finetuning: Mapping[str, Any] | None = None) -> Path:
    """Save `model` as a model folder (atomically); `model_config` (a `ModelConfig`, e.g. the pretrained
    backbone's `.lsmfm_config`) supplies patch size, voxel size, normalisation and pretraining provenance;
    its backbone and task entries are filled in here. `finetuning`: how the model was made (base model,
    shots, seed, data, test metrics; see `lsmfm.tasks.fewshot.finetuning_record`)."""
    from lsmfm.weights.format import save_model_dir

    classes = [str(c) for c in class_names or []]
    n_classes = getattr(model.head_config, "n_classes", None)
    if n_classes is not None and len(classes) != n_classes:
        raise ValueError(f"{model.task} model has {n_classes} classes but {len(classes)} "
                         f"class names were given: {classes}")
    task = {"name": model.task, "head": to_dict(model.head_config), "classes": classes,
            "threshold": float(threshold)}
    if finetuning:
        task["finetuning"] = dict(finetuning)
    config = dataclasses.replace(model_config, backbone=model.backbone.config, task=task)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    if model_card is None:
        model_card = task_model_card(config, state)
    return save_model_dir(out_dir, state, config, model_card=model_card, overwrite=overwrite)


def task_model_card(config: Any, state: Mapping[str, torch.Tensor], results_table: str | None = None
                    ) -> str:
    """The weights format's model card plus the task's own lines and how to use the model;
    `results_table`: the few-shot results of the run the model comes from."""
    from lsmfm.weights.card import render_model_card

    task = config.task
    spec = task_class(task["name"])
    use = ["## Use", "", "```python", "from lsmfm.tasks.models import load_task_model",
           'model, config = load_task_model("path/to/this/folder")', "```", ""]
    if spec.volume_output is not None:
        use += ["Whole volumes: `lsmfm predict --model path/to/this/folder --input VOLUME --out PRED.zarr`", ""]
    return render_model_card(config, state, title=f"lsmfm finetuned {task['name']} model",
                             extra=spec.card_lines(task), load=use, results_table=results_table)


def load_task_model(path: str | Path, device: str | torch.device = "cpu", follow_symlinks: bool = False
                    ) -> tuple[TaskModel, Any]:
    """Rebuild a finetuned model from its folder (or a paper finetuning `.ckpt`), in eval mode:
    (TaskModel, ModelConfig). `follow_symlinks`: accept folder files that are symlinks leading outside it."""
    from lsmfm.models.backbones.registry import build_backbone
    from lsmfm.weights.format import read_model_dir

    if Path(path).is_file() and Path(path).suffix in (".ckpt", ".pt"):
        from lsmfm.weights.paper import is_paper_finetuned
        from lsmfm.weights.torchfile import load_torch_file

        obj = load_torch_file(path)
        if not is_paper_finetuned(obj):
            raise InputError(path, "not a finetuned model: a .ckpt must be one of the LSM foundation model "
                                   "paper's finetuning checkpoints (state_dict keys model.*)")
        model, config = paper_task_model(obj, path)
        return model.to(device), config
    config, state = read_model_dir(path, follow_symlinks)
    task = config.task
    if not task:
        raise InputError(path, "holds a pretrained backbone without a task head; finetune it first "
                               "(`lsmfm finetune segment|classify|deblur`)")
    try:
        spec = task_class(task.get("name"))
        head = spec.read_head(task.get("head"), source=f"{path} config.json task.head")
        model = build_task_model(task["name"], build_backbone(config.backbone), head)
    except ConfigError as exc:
        raise InputError(path, f"invalid task in config: {exc}") from exc
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise InputError(path, f"weights do not match the configured {task['name']} model: {exc}") from exc
    return model.to(device).eval(), config


def paper_task_model(obj: Mapping[str, Any], path: str | Path) -> tuple[TaskModel, Any]:
    """A paper finetuning checkpoint as an lsmfm task model, for `lsmfm predict`: the network's output is
    the task's (segmentation logits; deblurring: a residual added to the input), so the head is a 1x1x1
    identity conv and the model computes exactly what the paper's module did."""
    from lsmfm.models.backbones.registry import build_backbone
    from lsmfm.weights.load import load_strict
    from lsmfm.weights.paper import from_paper_finetuned

    config, state = from_paper_finetuned(obj, path)
    hp = obj.get("hyper_parameters") or {}
    task = "deblur" if "edge_weight" in hp else "segment"
    if config.backbone.out_channels != config.backbone.in_channels:
        raise InputError(path, f"a paper finetuning checkpoint with {config.backbone.out_channels} output "
                               "channels: only segmentation and deblurring (one output channel) are read")
    backbone = build_backbone(config.backbone)
    load_strict(backbone, state, str(path))
    model = build_task_model(task, backbone)
    with torch.no_grad():
        model.head.weight.fill_(1.0)
        model.head.bias.zero_()
    config.task = {"name": task, "head": to_dict(model.head_config), "classes": [], "threshold": 0.5}
    return model.eval(), config
