"""`lsmfm export RUN_DIR --out DIR`: a pretraining run's checkpoint as a released weights folder.

The run's checkpoint (RUN_DIR/checkpoints/<tag>/, written by DeepSpeed `engine.save_checkpoint`) is
consolidated to one fp32 state dict, ZeRO shards included, with DeepSpeed's own `zero_to_fp32`; the
chosen backbone (`teacher.backbone.*` by default, or `student.backbone.*`) is checked strictly
against the architecture in RUN_DIR/config.yaml and written as `model.safetensors` + `config.json` +
a model card. The teacher is the default: it is the EMA of the student over training, the smoother
encoder that DINO/iBOT use for evaluation and downstream transfer.

Run folders are what colleagues share on cluster storage, so nothing in one is trusted: the tag must be a
plain name inside the run's checkpoints folder (`lsmfm.training.checkpoint.tag_path`), and every file is
unpickled weights-only with a vetted allowlist (`lsmfm.weights.torchfile`), `zero_to_fp32` included:
a pickle carrying code is refused before anything runs.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from lsmfm.config import from_dict, read_yaml
from lsmfm.data.normalize import NormalizeConfig
from lsmfm.errors import ConfigError, InputError
from lsmfm.models.backbones.registry import BackboneConfig, build_backbone
from lsmfm.weights.card import render_model_card
from lsmfm.weights.format import ModelConfig, save_model_dir
from lsmfm.weights.load import load_strict

MODEL_STATES = "mp_rank_00_model_states.pt"


def export_run(run_dir: str | Path, out_dir: str | Path, which: str = "teacher", tag: str | None = None,
               overwrite: bool = False) -> Path:
    """Export one backbone of a pretraining run; every input is checked before the weights are read."""
    if which not in ("teacher", "student"):
        raise InputError(None, f"--which must be teacher or student, got {which!r}")
    run = Path(run_dir)
    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise InputError(out, "already exists; choose another --out or pass --overwrite")
    tag_dir = _tag_dir(run, tag)
    # a tag carries the resolved config it was trained with; RUN_DIR/config.yaml is the fallback
    config_path = tag_dir / "config.yaml" if (tag_dir / "config.yaml").is_file() else run / "config.yaml"
    config = run_model_config(read_yaml(config_path), config_path, which, tag_dir)
    full = consolidate(tag_dir)
    prefix = f"{which}.backbone."
    state = {k[len(prefix):]: (v.float() if v.is_floating_point() else v) for k, v in full.items()
             if k.startswith(prefix)}
    if not state:
        found = sorted({".".join(k.split(".")[:2]) for k in full})
        raise InputError(tag_dir, f"no {prefix}* weights in this checkpoint; it holds {', '.join(found)}")
    load_strict(build_backbone(config.backbone), state, str(tag_dir))
    steps = read_step(tag_dir)
    if steps is not None:
        config.pretraining["steps"] = steps
    title = f"lsmfm {config.backbone.arch} backbone ({config.pretraining['mode']} pretraining, {which})"
    return save_model_dir(out, state, config, render_model_card(config, state, title), overwrite=overwrite)


def _tag_dir(run: Path, tag: str | None) -> Path:
    from lsmfm.training.checkpoint import best_tag, checkpoint_dir, latest_tag, tag_path

    if not run.is_dir():
        raise InputError(run, "run folder not found")
    root = checkpoint_dir(run)
    if tag == "best":
        tag = best_tag(run)
        if tag is None:
            raise InputError(root, "no checkpoints/best file: the run had no validation "
                                   "(validation.fraction)")
    if tag is None:
        tag = latest_tag(run)
        if tag is None:
            raise InputError(root, "no checkpoints/latest file: the run has no complete checkpoint "
                                   "(pass --tag?)")
    tag_dir = tag_path(run, tag)
    if not (tag_dir / MODEL_STATES).is_file():
        tags = sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
        raise InputError(tag_dir, f"not a DeepSpeed checkpoint (no {MODEL_STATES}); "
                                  f"tags here: {', '.join(tags) or 'none'}")
    return tag_dir


def run_model_config(raw: dict[str, Any], source: Path, which: str, tag_dir: Path) -> ModelConfig:
    """The ModelConfig of a run, from its resolved config (data, model and train sections)."""
    data = raw.get("data") or {}
    model = raw.get("model") or {}
    if "backbone" not in model:
        raise ConfigError(f"{source}: model.backbone is missing; cannot rebuild the network")
    backbone = from_dict(BackboneConfig, model["backbone"], source=str(source), prefix="model.backbone.")
    norm = data.get("normalize") or {}
    normalize = NormalizeConfig(**{k: norm[k] for k in ("lower", "upper", "clip") if k in norm})
    use_text = bool(model.get("use_text", False))
    pretraining = {
        "mode": "image_text" if use_text else "image_only",
        "recipe": _recipe(model, use_text),
        "data": catalog_sources(data.get("catalogs") or []),
        "source_checkpoint": str(tag_dir),
        "which": which,
        "zero_stage": (raw.get("train") or {}).get("zero_stage"),
    }
    if "source" in norm:  # percentiles per patch, or per volume at ingest ("store")
        pretraining["normalize_source"] = norm["source"]
    patch = data.get("patch_size", [96, 96, 96])
    patch = [int(patch)] * 3 if isinstance(patch, int) else [int(p) for p in patch]
    if data.get("read_size"):  # patches read at this size and resampled to patch_size (the paper's 96 -> 64)
        pretraining["resize"] = {"read": [int(r) for r in data["read_size"]], "network": patch}
    voxel = data.get("target_voxel_size")
    if voxel is not None:
        voxel = [float(voxel)] * 3 if isinstance(voxel, (int, float)) else [float(v) for v in voxel]
    try:
        return ModelConfig(backbone=backbone, patch_size=patch, voxel_size=voxel, normalize=normalize,
                           pretraining=pretraining)
    except ValueError as exc:
        raise ConfigError(f"{source}: {exc}") from exc


def _recipe(model: dict[str, Any], use_text: bool) -> str:
    parts = ["lsmfm pretrain: masked feature distillation to an EMA teacher (DINO/iBOT)",
             "masked reconstruction"]
    if use_text:
        parts.append("image-text CLIP")
    weights = {k: model[k].get("weight") for k in ("distill", "recon", "clip")
               if isinstance(model.get(k), dict)}
    known = ", ".join(f"{k} {v}" for k, v in weights.items() if v is not None and (k != "clip" or use_text))
    return " + ".join(parts) + (f" (loss weights: {known})" if known else "")


def catalog_sources(catalogs: list[str]) -> list[str]:
    """`catalog: entry ids` for each catalog, or the path alone when it cannot be read here."""
    out = []
    for path in catalogs:
        try:
            from lsmfm.data.catalog.entries import load_catalog

            ids = [str(e.id) for e in load_catalog(path)]
            out.append(f"{path}: {', '.join(ids)}")
        except Exception:  # a moved catalog must not block exporting the weights
            out.append(str(path))
    return out


def consolidate(tag_dir: Path) -> dict[str, torch.Tensor]:
    """The full fp32 module state dict of a DeepSpeed checkpoint tag, every file read weights-only.

    The saved module holds every tensor (frozen ones, the teacher's, included); with ZeRO, the fp32
    master weights of the trained parameters (exact under bf16) are merged from the optimizer partitions
    by DeepSpeed's `zero_to_fp32`, which alone would miss the frozen tensors of a stage-1 checkpoint.
    """
    from lsmfm.weights.torchfile import load_torch_file, no_pickled_code

    full = dict(load_torch_file(tag_dir / MODEL_STATES, deepspeed=True)["module"])
    if any(tag_dir.glob("*zero_pp_rank_*_optim_states.pt")):
        from lsmfm.extras import require

        zero = require("deepspeed.utils.zero_to_fp32", "train", "merging ZeRO checkpoint shards")
        with no_pickled_code(sorted(tag_dir.glob("*.pt"))):
            full.update(zero.get_fp32_state_dict_from_zero_checkpoint(str(tag_dir.parent), tag=tag_dir.name))
    return full


def read_step(tag_dir: Path) -> int | None:
    """Optimizer steps done, from the client state saved with the checkpoint."""
    from lsmfm.weights.torchfile import load_torch_file

    states = load_torch_file(tag_dir / MODEL_STATES, deepspeed=True)
    step = states.get("step", states.get("global_steps"))
    return int(step) if isinstance(step, int) else None
