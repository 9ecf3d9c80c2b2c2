"""The LSM foundation model paper's Lightning checkpoints (Zenodo 10.5281/zenodo.20146516), read directly.

Pretraining checkpoints (`pretrain_module_{unet,swinunetr}.py`): `{"state_dict": {"student_encoder.<k>",
"teacher_encoder.<k>", "reconstruction_head.*", "ema_decay", and with text "text_encoder.*" (a BERT),
"text_proj.*", "image_proj.*", "logit_scale"}, "hyper_parameters": its YAML config, "callbacks",
"optimizer_states", "loops", ...}` where `<k>` are the keys of a MONAI UNet or SwinUNETR (identical in
MONAI 1.4, which trained them, and 1.6). Finetuned checkpoints (`02-finetuning/scripts/`) hold one
network as `model.<k>` (a MONAI UNet or SwinUNETR whose output is the task's, e.g. 1 logit channel).
The architecture is inferred from the keys and tensor shapes and checked against `hyper_parameters`.

What the paper's code does, and how lsmfm reads it:
- **Which encoder** (`which="auto"`): the paper puts its teacher in eval mode once and its EMA copies
  parameters only, so with Lightning >= 2.2 (which keeps submodule modes) the teacher's BatchNorm
  statistics never leave their initial values (mean 0, var 1, 0 batches) while the student's are
  trained. `auto` takes the teacher when its statistics are trained (or it has no BatchNorm: SwinUNETR's
  instance norm), else the student, and says which and why in one line (`LsmfmNotice`).
- **Axes**: its NIfTI arrays come from nibabel in (x, y, z) order and go into the network as they are;
  the backbone is recorded with `axes: xyz`, so it takes lsmfm's (z, y, x) arrays and transposes them
  at its boundary.
- **Scale**: pretraining read 96³ patches and resized them to 64³ (`data.downsample`); the model config
  records `patch_size` 64³ and `pretraining.resize = {read, network}`, the voxel scale the network saw.
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch

from lsmfm.data.normalize import NormalizeConfig
from lsmfm.errors import InputError, LsmfmNotice, LsmfmWarning
from lsmfm.models.backbones.registry import BackboneConfig
from lsmfm.weights.format import ModelConfig

PREFIXES = {"teacher": "teacher_encoder.", "student": "student_encoder."}
WHICH = ("auto", "teacher", "student")
FINETUNED_PREFIX = "model."
# Parts of the pretraining module that are not the backbone: ignored on purpose.
IGNORED_PREFIXES = (
    "student_encoder.",
    "teacher_encoder.",
    "text_encoder.",
    "text_proj.",
    "image_proj.",
    "reconstruction_head.",
    "logit_scale",
    "ema_decay",
)
TEXT_PREFIXES = ("text_encoder.", "text_proj.", "image_proj.", "logit_scale")
# The published configs train on 96³ patches resized to 64³, normalised by the 1st-99th percentiles.
PAPER_PATCH = 64
PAPER_NORMALIZE = NormalizeConfig(lower=1.0, upper=99.0, clip=True)
PAPER = "LSM foundation model paper (arXiv 2605.26026; weights: Zenodo 10.5281/zenodo.20146516)"


@dataclass
class PaperCheckpoint:
    """One encoder of a paper checkpoint, ready for `build_backbone(config.backbone)`.

    `text_state`: the image-text parts (`text_encoder.*`, `text_proj.*`, `image_proj.*`, `logit_scale`),
    empty for image-only checkpoints; `hyper_parameters`: the paper's config as saved."""

    config: ModelConfig
    state_dict: dict[str, torch.Tensor]
    ignored: list[str]  # state-dict prefixes and top-level entries left out, for the record
    text_state: dict[str, torch.Tensor] = field(default_factory=dict)
    hyper_parameters: Mapping[str, Any] = field(default_factory=dict)


def is_paper_checkpoint(obj: Any) -> bool:
    sd = obj.get("state_dict") if isinstance(obj, dict) else None
    return isinstance(sd, Mapping) and any(k.startswith(tuple(PREFIXES.values())) for k in sd)


def is_paper_finetuned(obj: Any) -> bool:
    """A Lightning checkpoint whose state_dict is one network under `model.` (the finetuning scripts)."""
    sd = obj.get("state_dict") if isinstance(obj, dict) else None
    return (
        isinstance(sd, Mapping)
        and bool(sd)
        and not is_paper_checkpoint(obj)
        and any(k.startswith(FINETUNED_PREFIX) for k in sd)
    )


def batchnorm_state(state: Mapping[str, torch.Tensor]) -> str:
    """ "none" (no BatchNorm), "untrained" (every layer at its initial statistics) or "trained"."""
    layers = [k.removesuffix(".running_mean") for k in state if k.endswith(".running_mean")]
    if not layers:
        return "none"
    at_init = all(
        bool(torch.all(state[f"{n}.running_mean"] == 0))
        and bool(torch.all(state[f"{n}.running_var"] == 1))
        and int(state.get(f"{n}.num_batches_tracked", torch.tensor(0))) == 0
        for n in layers
    )
    return "untrained" if at_init else "trained"


def choose_encoder(sd: Mapping[str, torch.Tensor], which: str | None, path: str | Path) -> tuple[str, str]:
    """(teacher|student, why): `auto` by the teacher's BatchNorm statistics, or the one asked for."""
    which = which or "auto"
    if which not in WHICH:
        raise InputError(path, f"which must be one of {', '.join(WHICH)}, got {which!r}")
    teacher_bn = batchnorm_state(_encoder(sd, "teacher"))
    if which == "auto":
        if teacher_bn == "untrained" and batchnorm_state(_encoder(sd, "student")) == "trained":
            return "student", (
                "auto: the teacher's BatchNorm statistics were never updated (mean 0, var 1: the "
                "paper's teacher stays in eval mode and its EMA copies parameters only), the "
                "student's are trained"
            )
        reason = "has no BatchNorm" if teacher_bn == "none" else f"has {teacher_bn} BatchNorm statistics"
        return "teacher", f"auto: the EMA teacher {reason}"
    if which == "teacher" and teacher_bn == "untrained":
        warnings.warn(
            LsmfmWarning(
                f"{path}: the teacher's BatchNorm statistics are at their initial values (mean "
                "0, var 1); its eval-mode features differ from training: prefer which=auto "
                "(the student)"
            ),
            stacklevel=3,
        )
    return which, f"asked for the {which}"


def _encoder(sd: Mapping[str, torch.Tensor], which: str) -> dict[str, torch.Tensor]:
    prefix = PREFIXES[which]
    return {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}


def from_paper_checkpoint(
    obj: Mapping[str, Any], path: str | Path, which: str | None = None
) -> PaperCheckpoint:
    """Pick one encoder out of a loaded paper pretraining checkpoint (`which`: auto, teacher, student)."""
    sd = obj["state_dict"]
    which, why = choose_encoder(sd, which, path)
    state = _encoder(sd, which)
    if not state:
        found = sorted({k.split(".")[0] for k in sd})
        raise InputError(
            path, f"no {PREFIXES[which]}* keys (the {which}); the state_dict holds {', '.join(found)}"
        )
    unknown = sorted({k.split(".")[0] for k in sd if not k.startswith(IGNORED_PREFIXES)})
    if unknown:
        warnings.warn(
            f"{path}: state_dict entries not used by the backbone: {', '.join(unknown)}", stacklevel=3
        )
    hp = _section(obj, "hyper_parameters")
    text = {k: v for k, v in sd.items() if k.startswith(TEXT_PREFIXES)}
    pretraining = {
        "mode": "image_text" if text else "image_only",
        "recipe": "paper: iBOT-style masked feature distillation to an EMA teacher + masked L1 reconstruction"
        + (" + CLIP and image-text alignment (BERT text encoder)" if text else ""),
        "data": _data_sources(hp),
        "source_checkpoint": str(path),
        "which": which,
        "which_reason": why,
        "teacher_batchnorm": batchnorm_state(_encoder(sd, "teacher")),
        "paper": PAPER,
    }
    read, network = _patch_sizes(hp)
    if read != network:
        pretraining["resize"] = {"read": [read] * 3, "network": [network] * 3}
    for key in ("epoch", "global_step"):
        if isinstance(obj.get(key), int):
            pretraining[key] = obj[key]
    config = _paper_model_config(state, path, hp, network, pretraining)
    warnings.warn(LsmfmNotice(f"{path}: using the {which} encoder ({why})"), stacklevel=3)
    ignored = sorted({k.split(".")[0] + ".*" for k in sd if not k.startswith(PREFIXES[which])}) + sorted(
        k for k in obj if k != "state_dict"
    )
    return PaperCheckpoint(
        config=config, state_dict=state, ignored=ignored, text_state=text, hyper_parameters=hp
    )


def from_paper_finetuned(
    obj: Mapping[str, Any], path: str | Path
) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """The network of a paper finetuning checkpoint (`model.*`) with its config (`axes: xyz`, the paper's
    normalisation, the patch size of its `hyper_parameters` when recorded, else 96³ as the paper)."""
    sd = obj["state_dict"]
    state = {k[len(FINETUNED_PREFIX) :]: v for k, v in sd.items() if k.startswith(FINETUNED_PREFIX)}
    hp = _section(obj, "hyper_parameters")
    size = hp.get("patch_size") or hp.get("img_size") or 96
    size = int(size[0] if isinstance(size, (list, tuple)) else size)
    pretraining = {
        "source_checkpoint": str(path),
        "paper": PAPER,
        "finetuned_by": "the paper's finetuning scripts",
    }
    return _paper_model_config(state, path, {"model": {"unet": hp}}, size, pretraining), state


def _paper_model_config(state: Mapping[str, torch.Tensor], path: str | Path, hp: Mapping[str, Any],
                        size: int, pretraining: dict[str, Any]) -> ModelConfig:
    """Model config of a paper network: architecture from its tensors, (x, y, z) axes, its normalisation."""
    backbone = dataclasses.replace(infer_backbone_config(state, path, hp), axes="xyz")
    return ModelConfig(backbone=backbone, patch_size=[size] * 3, voxel_size=None, normalize=PAPER_NORMALIZE,
                       pretraining=pretraining)


def infer_backbone_config(
    state: Mapping[str, torch.Tensor], path: str | Path, hp: Mapping[str, Any] | None = None
) -> BackboneConfig:
    """Architecture and its arguments from MONAI key names and tensor shapes: the first registered
    architecture whose `from_paper_state` recognises the keys."""
    from lsmfm.models.backbones.registry import BACKBONES, backbone_config_class

    model_hp = _section(hp or {}, "model")
    found = (backbone_config_class(arch).from_paper_state(state, path, model_hp) for arch in BACKBONES)
    cfg = next((c for c in found if c is not None), None)
    if cfg is None:
        raise InputError(
            path, "encoder keys are neither a MONAI UNet (model.0.*) nor a SwinUNETR (swinViT.*)"
        )
    embed = model_hp.get("embed_dim")
    if isinstance(embed, int) and embed != cfg.out_channels:
        raise InputError(
            path,
            f"hyper_parameters say embed_dim {embed}, but the weights have "
            f"{cfg.out_channels} output channels",
        )
    return cfg


def _section(d: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    value = d.get(key)
    return value if isinstance(value, Mapping) else {}


def _patch_sizes(hp: Mapping[str, Any]) -> tuple[int, int]:
    """(voxels read per patch edge, voxels the network saw) as the paper's module computes `image_size`."""
    data = _section(hp, "data")
    base = int(data.get("base_patch_size", 96 if data.get("downsample") else PAPER_PATCH))
    if data.get("use_sub_patches"):
        sub = int(data.get("sub_patch_size", PAPER_PATCH))
        return sub, sub
    down = _section(data, "downsample")
    if down.get("enabled"):
        return base, int(down.get("target_size", PAPER_PATCH))
    return base, base


def _data_sources(hp: Mapping[str, Any]) -> list[str]:
    enable = _section(_section(hp, "data"), "enable")
    return [str(name) for name, on in enable.items() if on]
