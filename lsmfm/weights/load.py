"""`lsmfm.load_pretrained`: one call from any weights source to a ready backbone.

Sources, tried in this order: a local folder (our format, or a finetuned model whose `backbone.*`
keys are taken), a local file (`.safetensors` with its config, or a `.ckpt`/`.pt` in the paper's
Lightning layout), the name of a registered release, then a Hugging Face Hub repository
(`hf-hub:org/name[@revision]`, or a bare `org/name`: see `lsmfm.weights.download.hub_repo`).
Loading is strict: every key and shape must match the rebuilt network, or the error lists the
missing, unexpected and mis-shaped keys. Nothing pickled is ever executed, and neither DeepSpeed
nor transformers is imported (see `lsmfm/_monai.py`).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from lsmfm.errors import InputError
from lsmfm.models.backbones.registry import build_backbone
from lsmfm.weights.format import ModelConfig, read_model_dir, read_safetensors_file

LIST_MAX = 8
log = logging.getLogger(__name__)


def load_pretrained(source: str | Path, which: str | None = None, map_location: str | torch.device = "cpu",
                    revision: str | None = None, follow_symlinks: bool = False,
                    **hub_kwargs: Any) -> nn.Module:
    """Build the backbone described by `source` and load its weights exactly.

    Args:
        source: folder, `.safetensors`/`.ckpt` file, a release name (`lsmfm.weights.registry.RELEASES`),
            or a Hub repository `hf-hub:org/name[@revision]` / `org/name`.
        which: "auto" (default), "teacher" or "student" for checkpoints holding both (the paper's):
            auto takes the teacher unless its BatchNorm statistics were never trained (the paper's UNet
            teachers), then the student, saying which and why (`lsmfm.weights.paper`). For a
            single-network folder an explicit teacher/student must match the network it holds.
        map_location: device of the returned module.
        follow_symlinks: read a local folder whose files are symlinks leading outside it (refused
            otherwise; Hub snapshots, symlinks into huggingface_hub's own cache, are always read).
        revision, hub_kwargs: for Hub repositories, passed to `huggingface_hub.snapshot_download`
            (`token`, `cache_dir`, ...).

    Returns:
        The backbone in eval mode, with its `ModelConfig` as attribute `lsmfm_config`.

    Example:
        >>> net = load_pretrained("runs/exported")
        >>> net.lsmfm_config.patch_size
        [64, 64, 64]
    """
    config, state, origin = _resolve(source, which, revision, follow_symlinks, hub_kwargs)
    net = build_backbone(config.backbone)
    load_strict(net, state, origin)
    net.lsmfm_config = config
    return net.to(map_location).eval()


def _resolve(source: str | Path, which: str | None, revision: str | None, follow_symlinks: bool,
             hub_kwargs: dict[str, Any]) -> tuple[ModelConfig, dict[str, torch.Tensor], str]:
    from lsmfm.weights.download import hub_repo, snapshot
    from lsmfm.weights.registry import RELEASES

    text = str(source)
    path = Path(text).expanduser()
    if path.is_dir():
        return _single_network(*read_model_dir(path, follow_symlinks), path, which)
    if path.is_file():
        return _from_file(path, which)
    if text in RELEASES:
        return _from_release(text, which)
    repo = hub_repo(text)
    if repo is not None:
        folder = snapshot(repo, revision, **hub_kwargs)
        config, state, origin = _single_network(*read_model_dir(folder, follow_symlinks=True), folder, which)
        # huggingface_hub names a snapshot folder by its commit: what a branch or tag resolved to, now
        config.pretraining["source"] = f"hf-hub:{repo.partition('@')[0]}@{folder.name}"
        return config, state, origin
    raise InputError(source, "not found: no such file or folder, not an hf-hub:org/name id, and not a "
                             f"registered release ({', '.join(sorted(RELEASES))})")


def _from_file(path: Path, which: str | None) -> tuple[ModelConfig, dict[str, torch.Tensor], str]:
    if path.suffix == ".safetensors":
        return _single_network(*read_safetensors_file(path), path, which)
    from lsmfm.weights.paper import from_paper_checkpoint, is_paper_checkpoint, is_paper_finetuned
    from lsmfm.weights.torchfile import load_torch_file

    obj = load_torch_file(path)
    if is_paper_finetuned(obj):
        from lsmfm.weights.paper import from_paper_finetuned

        return (*from_paper_finetuned(obj, path), str(path))
    if not is_paper_checkpoint(obj):
        raise InputError(path, "not a checkpoint in the paper's layout (a dict whose state_dict holds "
                               "student_encoder.* / teacher_encoder.* keys, or a finetuned model.*); for "
                               "DeepSpeed runs use `lsmfm export`")
    ckpt = from_paper_checkpoint(obj, path, which)
    log.info("%s: using the %s encoder; ignored: %s", path, ckpt.config.pretraining["which"],
             ", ".join(ckpt.ignored))
    return ckpt.config, ckpt.state_dict, str(path)


def _from_release(name: str, which: str | None) -> tuple[ModelConfig, dict[str, torch.Tensor], str]:
    from lsmfm.weights.download import fetch_release
    from lsmfm.weights.registry import check_arch, get_release

    release = get_release(name)
    path = fetch_release(release)
    config, state, origin = _from_file(path, which)
    check_arch(release, config.backbone, path)
    config.pretraining["release"] = name
    return config, state, origin


def _single_network(config: ModelConfig, state: dict[str, torch.Tensor], path: Path,
                    which: str | None) -> tuple[ModelConfig, dict[str, torch.Tensor], str]:
    """Our format holds one network; a finetuned model's `backbone.*` keys are that network."""
    stored = config.pretraining.get("which")
    if which is not None and which not in ("auto", "teacher", "student"):
        raise InputError(path, f"which must be 'auto', 'teacher' or 'student', got {which!r}")
    if which not in (None, "auto") and stored is not None and which != stored:
        raise InputError(path, f"holds the {stored} network only, not the {which}; export the {which} "
                               f"with `lsmfm export RUN_DIR --which {which}`")
    if config.task is not None or any(k.startswith("backbone.") for k in state):
        state = {k.removeprefix("backbone."): v for k, v in state.items() if k.startswith("backbone.")}
        if not state:
            raise InputError(path, "finetuned model without backbone.* weights")
    return config, state, str(path)


def load_strict(net: nn.Module, state: Mapping[str, torch.Tensor], origin: str) -> None:
    """Copy `state` into `net`, or raise listing every mismatching key: never a partial load."""
    expected = net.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [f"{k} (file {tuple(state[k].shape)}, model {tuple(expected[k].shape)})"
              for k in expected if k in state and state[k].shape != expected[k].shape]
    problems = [f"{label} {len(keys)}: {_few(keys)}" for label, keys in
                (("missing", missing), ("unexpected", unexpected), ("shape mismatch", shapes)) if keys]
    if problems:
        arch = getattr(getattr(net, "config", None), "arch", type(net).__name__)
        raise InputError(origin, f"weights do not fit the {arch} built from its config; "
                                 + "; ".join(problems))
    net.load_state_dict(state, strict=True)


def _few(keys: list[str]) -> str:
    more = f", ... ({len(keys) - LIST_MAX} more)" if len(keys) > LIST_MAX else ""
    return ", ".join(keys[:LIST_MAX]) + more
