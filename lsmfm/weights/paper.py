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
from lsmfm.models.backbones import BackboneConfig
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
    """Architecture and its arguments from MONAI key names and tensor shapes."""
    model_hp = _section(hp or {}, "model")
    if "swinViT.patch_embed.proj.weight" in state:
        cfg = _infer_swin(state, path)
    elif any(k.startswith("model.0.") for k in state):
        cfg = _infer_unet(state, path, _section(model_hp, "unet"))
    else:
        raise InputError(path, "encoder keys are neither a MONAI UNet (model.0.*) nor a SwinUNETR "
                               "(swinViT.*)")
    embed = model_hp.get("embed_dim")
    if isinstance(embed, int) and embed != cfg.out_channels:
        raise InputError(path, f"hyper_parameters say embed_dim {embed}, but the weights have "
                               f"{cfg.out_channels} output channels")
    return cfg


def _norm_of(state: Mapping[str, torch.Tensor], stem: str, path: str | Path) -> str:
    """MONAI norms: batch has running stats, affine-free instance norm (the default) has no tensors."""
    if f"{stem}.running_mean" in state:
        return "batch"
    if f"{stem}.weight" in state:
        raise InputError(path, f"unsupported normalisation layer at {stem} (only batch and instance norm)")
    return "instance"


def _infer_swin(state: Mapping[str, torch.Tensor], path: str | Path) -> BackboneConfig:
    embed = state["swinViT.patch_embed.proj.weight"]
    out = state.get("out.conv.conv.weight")
    if out is None:
        raise InputError(path, "SwinUNETR weights without out.conv.conv.weight (output layer)")
    return BackboneConfig(arch="swinunetr", in_channels=int(embed.shape[1]), out_channels=int(out.shape[0]),
                          feature_size=int(embed.shape[0]),
                          norm=_norm_of(state, "encoder1.layer.norm1", path))


def _infer_unet(state: Mapping[str, torch.Tensor], path: str | Path,
                unet_hp: Mapping[str, Any]) -> BackboneConfig:
    """Walk MONAI UNet's nesting: level i lives under model.(1.submodule.)^i; the bottom has no 0./2."""
    residual = "model.0.conv.unit0.conv.weight" in state
    first = "conv.unit0.conv.weight" if residual else "conv.weight"
    channels, strided = [], []
    level = "model."
    while f"{level}0.{first}" in state:
        channels.append(int(state[f"{level}0.{first}"].shape[0]))
        res = state.get(f"{level}0.residual.weight")
        # MONAI: a 3x3x3 residual conv means a strided level, 1x1x1 (or none, same width) stride 1;
        # without residual units the stride is not visible in the shapes and the paper's 2 is assumed.
        strided.append(res.shape[-1] != 1 if res is not None else not residual)
        level += "1.submodule."
    if f"{level}{first}" not in state or not channels:
        raise InputError(path, f"UNet weights without the expected bottom layer {level}{first}")
    channels.append(int(state[f"{level}{first}"].shape[0]))
    strides = [2 if s else 1 for s in strided]
    hp_strides = unet_hp.get("strides")
    if isinstance(hp_strides, (list, tuple)) and len(hp_strides) == len(strides):
        if [int(s) != 1 for s in hp_strides] != strided:
            raise InputError(path, f"hyper_parameters strides {list(hp_strides)} disagree with the weights")
        strides = [int(s) for s in hp_strides]
    units = sum(1 for k in state if k.startswith("model.0.conv.unit") and k.endswith(".conv.weight"))
    up = state["model.2.0.conv.weight" if residual else "model.2.conv.weight"]
    stem = "model.0.conv.unit0.adn.N" if residual else "model.0.adn.N"
    return BackboneConfig(arch="unet", in_channels=int(state[f"model.0.{first}"].shape[1]),
                          out_channels=int(up.shape[1]), channels=channels, strides=strides,
                          num_res_units=units, norm=_norm_of(state, stem, path))


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
