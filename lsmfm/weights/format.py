"""The released-weights format: a folder with `model.safetensors` + `config.json` (+ a README.md model card).

`config.json` is a `ModelConfig`: everything needed to rebuild and use the network from the folder
alone (architecture and its arguments, patch size, voxel size, normalisation, how it was pretrained,
and for finetuned models the task head). The tensors are safetensors, so reading a release never
unpickles anything. The same JSON is embedded in the safetensors header, so a lone `.safetensors`
file stays self-describing.

Example:
    >>> save_model_dir("out", net.state_dict(), ModelConfig(backbone=net.config, patch_size=[64, 64, 64]))
    >>> cfg, state = read_model_dir("out")
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch

from lsmfm.config import from_dict, to_dict
from lsmfm.data.normalize import NormalizeConfig
from lsmfm.errors import ConfigError, InputError
from lsmfm.io.atomic import atomic_dir, share_per_umask
from lsmfm.provenance import provenance
from lsmfm.tasks.registry import TASKS
from lsmfm.models.backbones.registry import BackboneConfig, default_backbone_config

FORMAT_VERSION = 1
WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
CARD_NAME = "README.md"
METADATA_KEY = "lsmfm_config"


@dataclass
class ModelConfig:
    """What a weights folder holds besides the tensors.

    Args:
        format_version: version of this layout; a newer one than this code knows is refused.
        backbone: architecture and its arguments (`build_backbone(backbone)` rebuilds the network).
        patch_size: (z, y, x) voxels of the patches the network was trained on.
        voxel_size: (z, y, x) µm the training data was resampled to; None when not fixed (mixed sources).
        normalize: the intensity normalisation inputs must get before the network sees them.
        pretraining: mode ("image_only" | "image_text"), recipe, data sources, source checkpoint,
            which network of the student/teacher pair these weights are, steps.
        task: None for a pretrained backbone; finetuned models set {"name": a registered task,
            "head": {...}} and store their weights as `backbone.*` + `head.*`.
        provenance: the lsmfm version and git commit that wrote the folder (set when it is saved).
    """

    format_version: int = FORMAT_VERSION
    backbone: BackboneConfig = field(default_factory=default_backbone_config)
    patch_size: list[int] = field(default_factory=lambda: [64, 64, 64])
    voxel_size: list[float] | None = None
    normalize: NormalizeConfig = field(default_factory=NormalizeConfig)
    pretraining: dict[str, Any] = field(default_factory=dict)
    task: dict[str, Any] | None = None
    provenance: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.format_version > FORMAT_VERSION:
            raise ValueError(f"format_version {self.format_version} is newer than this lsmfm reads "
                             f"({FORMAT_VERSION}); upgrade lsmfm")
        if len(self.patch_size) != 3 or min(self.patch_size) < 1:
            raise ValueError(f"patch_size must be 3 positive ints (z, y, x), got {self.patch_size}")
        m = self.backbone.input_multiple
        if any(s % m for s in self.patch_size):
            raise ValueError(f"patch_size {self.patch_size} must be divisible by {m} "
                             f"for {self.backbone.arch}")
        if self.voxel_size is not None and (len(self.voxel_size) != 3 or min(self.voxel_size) <= 0):
            raise ValueError(f"voxel_size must be 3 positive numbers (z, y, x) in µm or null, "
                             f"got {self.voxel_size}")
        mode = self.pretraining.get("mode")
        if mode is not None and mode not in ("image_only", "image_text"):
            raise ValueError(f"pretraining.mode must be image_only or image_text, got {mode!r}")
        which = self.pretraining.get("which")
        if which is not None and which not in ("teacher", "student"):
            raise ValueError(f"pretraining.which must be teacher or student, got {which!r}")
        if self.task is not None and self.task.get("name") not in TASKS:
            raise ValueError(f"task.name must be one of {sorted(TASKS)}, got {self.task.get('name')!r}")

    def to_json(self) -> str:
        return json.dumps(to_dict(self), indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str, source: str = "<json>") -> ModelConfig:
        """Parse and validate; unknown keys and bad values raise ConfigError naming `source`."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{source}: not valid JSON: {exc}") from exc
        return from_dict(cls, data, source=source)


def config_for(backbone: torch.nn.Module) -> ModelConfig:
    """The backbone's own ModelConfig: the one it was loaded with, else one built from its architecture."""
    existing = getattr(backbone, "lsmfm_config", None)
    if isinstance(existing, ModelConfig):
        return existing
    arch = getattr(backbone, "config", None)
    if not isinstance(arch, BackboneConfig):
        raise TypeError(f"{type(backbone).__name__} is not an lsmfm backbone (no BackboneConfig in .config)")
    m = arch.input_multiple
    return ModelConfig(backbone=arch, patch_size=[m * -(-64 // m)] * 3)


def write_model_files(folder: str | Path, state_dict: Mapping[str, torch.Tensor], config: ModelConfig,
                      model_card: str | None = None) -> None:
    """Write the weights, config and card into an existing folder (callers make it atomic)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    config = dataclasses.replace(config, provenance=provenance())
    text = config.to_json()
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in state_dict.items()}
    save_file(tensors, str(folder / WEIGHTS_NAME), metadata={"format": "pt", METADATA_KEY: text})
    share_per_umask(folder / WEIGHTS_NAME)  # safetensors creates it 0600
    (folder / CONFIG_NAME).write_text(text)
    if model_card is None:
        from lsmfm.weights.card import render_model_card

        model_card = render_model_card(config, tensors)
    (folder / CARD_NAME).write_text(model_card)


def save_model_dir(out_dir: str | Path, state_dict: Mapping[str, torch.Tensor], config: ModelConfig,
                   model_card: str | None = None, *, overwrite: bool = False) -> Path:
    """Write a weights folder atomically (temporary folder, then rename); returns its path."""
    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise InputError(out, "already exists; choose another folder or pass overwrite=True")
    with atomic_dir(out, overwrite=overwrite) as tmp:
        write_model_files(tmp, state_dict, config, model_card)
    return out


def read_safetensors(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and header metadata of a safetensors file; a corrupt or truncated file raises InputError."""
    from safetensors import SafetensorError, safe_open

    p = Path(path)
    if not p.is_file():
        raise InputError(p, "file not found")
    try:
        with safe_open(str(p), framework="pt", device="cpu") as fh:
            metadata = dict(fh.metadata() or {})
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    except (SafetensorError, OSError) as exc:
        raise InputError(p, f"not a readable safetensors file (truncated or corrupt?): {exc}") from exc
    return tensors, metadata


def check_links(folder: Path, names: tuple[str, ...], follow_symlinks: bool) -> None:
    """Refuse a file of `folder` that is a symlink leading outside it, unless `follow_symlinks`: a shared
    model folder must not make lsmfm read (or pass off as the model) a file from elsewhere."""
    real = Path(os.path.realpath(folder))
    for name in names:
        target = Path(os.path.realpath(folder / name))
        if (folder / name).is_symlink() and not target.is_relative_to(real) and not follow_symlinks:
            raise InputError(folder / name, f"is a symlink to {target}, outside the model folder; refused "
                                            "(pass follow_symlinks=True, or --follow-symlinks, if you trust "
                                            "it)")


def read_model_dir(path: str | Path, follow_symlinks: bool = False
                   ) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """Read a weights folder (safetensors only, never pickle); the config keys are validated. Its files
    may be symlinks leading outside the folder only with `follow_symlinks` (Hub snapshots are)."""
    folder = Path(path)
    if not folder.is_dir():
        raise InputError(folder, "not a folder")
    check_links(folder, (WEIGHTS_NAME, CONFIG_NAME), follow_symlinks)
    missing = [n for n in (WEIGHTS_NAME, CONFIG_NAME) if not (folder / n).is_file()]
    if missing:
        hint = " (pickled .bin/.pt weights are not read; convert them to safetensors)" \
            if any(folder.glob("*.bin")) or any(folder.glob("*.pt")) else ""
        raise InputError(folder, f"not an lsmfm weights folder: missing {', '.join(missing)}{hint}")
    config = ModelConfig.from_json((folder / CONFIG_NAME).read_text(), source=str(folder / CONFIG_NAME))
    tensors, _ = read_safetensors(folder / WEIGHTS_NAME)
    return config, tensors


def read_safetensors_file(path: str | Path) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """A lone `.safetensors` file: config from a sibling config.json, else from its embedded header."""
    p = Path(path)
    tensors, metadata = read_safetensors(p)
    sibling = p.with_name(CONFIG_NAME)
    if sibling.is_file():
        return ModelConfig.from_json(sibling.read_text(), source=str(sibling)), tensors
    if METADATA_KEY in metadata:
        return ModelConfig.from_json(metadata[METADATA_KEY], source=f"{p} (embedded config)"), tensors
    raise InputError(p, f"no {CONFIG_NAME} next to it and no embedded lsmfm config; "
                        "the architecture is unknown")
