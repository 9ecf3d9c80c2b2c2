"""The LSM foundation model paper's Lightning checkpoints (Zenodo 10.5281/zenodo.20146516), read directly.

Layout: `{"state_dict": {"student_encoder.<k>": ..., "teacher_encoder.<k>": ..., "text_encoder.*", ...},
"epoch": ..., "hyper_parameters": {...}, "optimizer_states": ..., ...}` where `<k>` are the keys of a
MONAI UNet or SwinUNETR (identical key names and shapes in MONAI 1.4, which trained them, and 1.6).
The architecture is inferred from the keys and checked against `hyper_parameters` when present.

The EMA teacher is returned by default: in DINO/iBOT practice it is the smoother, better-performing
encoder (an average of the student over many steps), and its BatchNorm statistics were accumulated on
unmasked inputs, as downstream use sees them. `which="student"` gives the student, which the paper's
own finetuning scripts loaded.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch

from lsmfm.data.normalize import NormalizeConfig
from lsmfm.errors import InputError
from lsmfm.models.backbones.registry import BackboneConfig
from lsmfm.weights.format import ModelConfig

PREFIXES = {"teacher": "teacher_encoder.", "student": "student_encoder."}
# Parts of the pretraining module that are not the backbone: ignored on purpose.
IGNORED_PREFIXES = ("student_encoder.", "teacher_encoder.", "text_encoder.", "text_proj.", "image_proj.",
                    "reconstruction_head.", "logit_scale", "ema_decay")
TEXT_PREFIXES = ("text_encoder.", "text_proj.", "image_proj.", "logit_scale")
# The published configs train on 96³ patches resized to 64³, normalised by the 1st-99th percentiles.
PAPER_PATCH = 64
PAPER_NORMALIZE = NormalizeConfig(lower=1.0, upper=99.0, clip=True)
PAPER = "LSM foundation model paper (arXiv 2605.26026; weights: Zenodo 10.5281/zenodo.20146516)"


@dataclass
class PaperCheckpoint:
    """One encoder of a paper checkpoint, ready for `build_backbone(config.backbone)`."""

    config: ModelConfig
    state_dict: dict[str, torch.Tensor]
    ignored: list[str]  # state-dict prefixes and top-level entries left out, for the record


def is_paper_checkpoint(obj: Any) -> bool:
    sd = obj.get("state_dict") if isinstance(obj, dict) else None
    return isinstance(sd, Mapping) and any(k.startswith(tuple(PREFIXES.values())) for k in sd)


def from_paper_checkpoint(obj: Mapping[str, Any], path: str | Path,
                          which: str | None = None) -> PaperCheckpoint:
    """Pick the teacher (default) or student encoder out of a loaded paper checkpoint."""
    which = which or "teacher"
    if which not in PREFIXES:
        raise InputError(path, f"which must be 'teacher' or 'student', got {which!r}")
    sd = obj["state_dict"]
    prefix = PREFIXES[which]
    state = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    if not state:
        found = sorted({k.split(".")[0] for k in sd})
        raise InputError(path, f"no {prefix}* keys (the {which}); the state_dict holds {', '.join(found)}")
    unknown = sorted({k.split(".")[0] for k in sd if not k.startswith(IGNORED_PREFIXES)})
    if unknown:
        warnings.warn(f"{path}: state_dict entries not used by the backbone: {', '.join(unknown)}",
                      stacklevel=3)
    hp = _section(obj, "hyper_parameters")
    backbone = infer_backbone_config(state, path, hp)
    text = any(k.startswith(TEXT_PREFIXES) for k in sd)
    pretraining = {
        "mode": "image_text" if text else "image_only",
        "recipe": "paper: iBOT-style masked feature distillation to an EMA teacher + masked L1 reconstruction"
                  + (" + CLIP and image-text alignment (BERT text encoder)" if text else ""),
        "data": _data_sources(hp),
        "source_checkpoint": str(path),
        "which": which,
        "paper": PAPER,
    }
    for key in ("epoch", "global_step"):
        if isinstance(obj.get(key), int):
            pretraining[key] = obj[key]
    config = ModelConfig(backbone=backbone, patch_size=[_patch_size(hp)] * 3, voxel_size=None,
                         normalize=PAPER_NORMALIZE, pretraining=pretraining)
    ignored = sorted({k.split(".")[0] + ".*" for k in sd if not k.startswith(prefix)}) \
        + sorted(k for k in obj if k != "state_dict")
    return PaperCheckpoint(config=config, state_dict=state, ignored=ignored)


def infer_backbone_config(state: Mapping[str, torch.Tensor], path: str | Path,
                          hp: Mapping[str, Any] | None = None) -> BackboneConfig:
    """Architecture and its arguments from MONAI key names and tensor shapes: the first registered
    architecture whose `from_paper_state` recognises the keys."""
    from lsmfm.models.backbones.registry import BACKBONES, backbone_config_class

    model_hp = _section(hp or {}, "model")
    found = (backbone_config_class(arch).from_paper_state(state, path, model_hp) for arch in BACKBONES)
    cfg = next((c for c in found if c is not None), None)
    if cfg is None:
        raise InputError(path, "encoder keys are neither a MONAI UNet (model.0.*) nor a SwinUNETR "
                               "(swinViT.*)")
    embed = model_hp.get("embed_dim")
    if isinstance(embed, int) and embed != cfg.out_channels:
        raise InputError(path, f"hyper_parameters say embed_dim {embed}, but the weights have "
                               f"{cfg.out_channels} output channels")
    return cfg


def _section(d: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    value = d.get(key)
    return value if isinstance(value, dict) else {}


def _patch_size(hp: Mapping[str, Any]) -> int:
    data = _section(hp, "data")
    if data.get("use_sub_patches"):
        return int(data.get("sub_patch_size", PAPER_PATCH))
    down = _section(data, "downsample")
    if down.get("enabled"):
        return int(down.get("target_size", PAPER_PATCH))
    return int(data.get("base_patch_size", PAPER_PATCH))


def _data_sources(hp: Mapping[str, Any]) -> list[str]:
    enable = _section(_section(hp, "data"), "enable")
    return [str(name) for name, on in enable.items() if on]
