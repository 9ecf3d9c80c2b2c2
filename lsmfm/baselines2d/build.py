"""Build a baseline: the foundation model with its decoder, then the PEFT method; counts; saved adapters.

`prepare` freezes everything, unfreezes the decoder when the method trains it, and lets the method add
or unfreeze its own parameters, so `trainable_params` is exactly decoder + method. Decoder parts that
cannot reach the output (SAM's IoU head and multimask hypernetworks) stay frozen, so every trainable
parameter receives a gradient.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from lsmfm.baselines2d.config import Baseline2DConfig, ModelConfig, PeftConfig
from lsmfm.baselines2d.models.base import LightHead, Segmenter2D
from lsmfm.baselines2d.models.efficell import EffiCellHead, tap_layers
from lsmfm.baselines2d.registry import get_method
from lsmfm.config import load_config, save_config
from lsmfm.errors import InputError
from lsmfm.io.atomic import share_per_umask


def build_model(cfg: ModelConfig) -> Segmenter2D:
    """The foundation model (weights or seeded random init) with the decoder named by `cfg.decoder`."""
    from lsmfm.baselines2d.models.clip import build_clip
    from lsmfm.baselines2d.models.dino import build_dinov2, build_dinov3
    from lsmfm.baselines2d.models.sam import build_sam

    builders = {"sam": build_sam, "dinov2": build_dinov2, "dinov3": build_dinov3, "clip": build_clip}
    model = builders[cfg.name](cfg)
    torch.manual_seed(cfg.init_seed)
    hidden = model.hidden_size
    if cfg.decoder == "efficell":
        model.head = EffiCellHead(
            hidden, model.feature_channels, tap_layers(len(model.layers)), dim=min(256, max(32, hidden // 2))
        )
    elif cfg.name != "sam":
        model.head = LightHead(model.feature_channels, dim=min(128, max(16, hidden // 4)))
    return model


def prepare(model: Segmenter2D, cfg: PeftConfig) -> Segmenter2D:
    """Apply the PEFT method in place: only the decoder (if the method trains it) and the method's own
    parameters train."""
    info = get_method(cfg.method)
    if model.name not in info.models:
        raise InputError(None, f"peft.method={cfg.method} does not apply to model {model.name}")
    model.requires_grad_(False)
    if info.train_decoder:
        model.head.requires_grad_(True)
    info.load().apply(model, cfg)
    for module in getattr(model.head, "unused_modules", list)():
        module.requires_grad_(False)
    return model


def build_baseline(cfg: Baseline2DConfig) -> Segmenter2D:
    return prepare(build_model(cfg.model), cfg.peft)


def parameter_count(p: nn.Parameter) -> int:
    """Logical element count; 4-bit bitsandbytes weights are stored packed, two values per byte."""
    state = getattr(p, "quant_state", None)
    return int(state.shape.numel()) if state is not None else p.numel()


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    params = list(model.parameters())
    return (
        sum(parameter_count(p) for p in params if p.requires_grad),
        sum(parameter_count(p) for p in params),
    )


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}


def save_adapted(model: nn.Module, cfg: Baseline2DConfig, folder: str | Path) -> None:
    """The resolved config and the trainable parameters: with the base weights, enough to rebuild the
    adapted model."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_config(cfg, folder / "config.yaml")
    save_file(trainable_state(model), str(folder / "trainable.safetensors"))
    share_per_umask(folder / "trainable.safetensors")


def load_adapted(folder: str | Path) -> tuple[Segmenter2D, Baseline2DConfig]:
    """Rebuild a model saved by `save_adapted` (the base weights must be available as configured)."""
    from safetensors.torch import load_file

    folder = Path(folder)
    for name in ("config.yaml", "trainable.safetensors"):
        if not (folder / name).is_file():
            raise InputError(folder, f"not an adapted baseline2d model: {name} is missing")
    cfg = load_config(Baseline2DConfig, folder / "config.yaml")
    model = build_baseline(cfg)
    state = load_file(str(folder / "trainable.safetensors"))
    expected = set(trainable_state(model))
    if set(state) != expected:
        raise InputError(
            folder,
            f"trainable.safetensors does not match the configured method "
            f"({len(state)} tensors saved, {len(expected)} expected)",
        )
    model.load_state_dict(state, strict=False)
    return model, cfg
