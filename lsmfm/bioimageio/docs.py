"""The words of a bioimage.io package: name, description, authors, citations, tags, documentation (the model
card plus how to use the package and how it differs from `lsmfm predict`) and the conda environment."""
from __future__ import annotations

import getpass
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lsmfm.errors import ConfigError

if TYPE_CHECKING:
    from lsmfm.bioimageio.package import PackageOptions, Parts

NAME_CHARACTERS = re.compile(r"[^A-Za-z0-9_+\- ()]")


def check_name(name: str | None) -> None:
    """A package name bioimage.io accepts: 5 to 128 letters, digits, spaces or `_+-()`."""
    if name is not None and (NAME_CHARACTERS.search(name) or not 5 <= len(name) <= 128):
        raise ConfigError(f"--name {name!r}: 5 to 128 letters, digits, spaces or _+-() only")


def package_name(parts: Parts, opts: PackageOptions) -> str:
    """The package name: `opts.name`, or e.g. "lsmfm segment UNet (light-sheet 3D)"."""
    check_name(opts.name)
    return opts.name or f"lsmfm {parts.config.task['name']} {parts.network[0]} (light-sheet 3D)"


def description(parts: Parts) -> str:
    config = parts.config
    tuned = (config.task or {}).get("finetuning") or {}
    init = tuned.get("init")
    start = f", finetuned few-shot from {tuned['base_model']}" if tuned.get("base_model") else (
        f" ({init} initialisation)" if init else "")
    from lsmfm.tasks.registry import task_class

    return (f"3D {task_class(config.task['name']).summary} of light-sheet fluorescence microscopy volumes: a "
            f"{config.backbone.card_line()}{start}, trained with lsmfm. Output: {parts.output.description}.")


def metadata(parts: Parts, opts: PackageOptions) -> dict[str, Any]:
    """Name, authors, licence, citations, tags, files and lsmfm's own record (config.lsmfm)."""
    from lsmfm.citation import MONAI, MONAI_DOI, PAPER, PAPER_DOI, lsmfm_citation, project_url
    from lsmfm.provenance import provenance

    authors = list(opts.authors) or [getpass.getuser()]
    cite = [{"text": PAPER, "doi": PAPER_DOI}, {"text": lsmfm_citation()}, {"text": MONAI, "doi": MONAI_DOI}]
    repo = project_url("Repository")
    if repo:
        cite[1]["url"] = repo
    meta: dict[str, Any] = {
        "type": "model", "format_version": _format_version(), "name": package_name(parts, opts),
        "authors": [{"name": a} for a in authors], "cite": cite, "license": opts.license,
        "documentation": {"source": "README.md"}, "covers": [{"source": "cover.png"}], "attachments": [{"source": "config.json"}],
        "tags": ["3d", "light-sheet-microscopy", "fluorescence-light-microscopy", "lsmfm", "pytorch",
                 parts.config.backbone.arch, *parts.output.tags],
        "config": {"lsmfm": {"provenance": provenance(), "model_config": "config.json",
                             "task": parts.config.task["name"], "patch_size": list(parts.config.patch_size)}},
    }
    if repo:
        meta["git_repo"] = repo
    return meta


def _format_version() -> str:
    from bioimageio.spec.model.v0_5 import ModelDescr

    return str(ModelDescr.implemented_format_version)


def documentation(model_dir: Path, parts: Parts) -> str:
    """The model folder's card (its few-shot table included) without its Hub front matter, then the
    package's own section."""
    from lsmfm.weights.format import CARD_NAME

    card_path = model_dir / CARD_NAME
    if card_path.is_file():
        card = card_path.read_text()
    else:
        from lsmfm.tasks.models import task_model_card

        card = task_model_card(parts.config, parts.model.state_dict())
    card = re.sub(r"\A---\n.*?\n---\n+", "", card, flags=re.S)
    return card.rstrip() + "\n\n" + "\n".join(package_section(parts)) + "\n"


def package_section(parts: Parts) -> list[str]:
    norm = parts.config.normalize
    m = parts.config.backbone.size_multiple
    if parts.scripted:
        shapes = f"any multiple of {m} voxels per axis (the network's size multiple)"
    else:
        shapes = f"exactly {' x '.join(map(str, parts.config.patch_size))} voxels (z, y, x)"
    post = (f"sigmoid, then binarize at the recorded threshold {parts.threshold} (a uint8 mask)"
            if parts.threshold is not None else
            "none: the restored image stays on the normalised scale, where the input's percentile bounds "
            "are 0 and 1 (`lsmfm predict` maps it back to intensity units)")
    return [
        "## This bioimage.io package", "",
        "Written by `lsmfm export --format bioimageio`. Weights: `pytorch_state_dict` (architecture "
        "`network.py`: torch and MONAI only) and TorchScript (for deepImageJ).", "",
        f"- Input `raw`: axes batch, channel, z, y, x; {shapes}.",
        f"- Preprocessing: `scale_range` between the {norm.lower} and {norm.upper} percentiles of each "
        "channel of the whole input" + (", then `clip` to [0, 1]" if norm.clip else "") + ".",
        f"- Output `{parts.output.id}`: {parts.output.description}; postprocessing: {post}.",
        "- No halo is declared (see below): when tiling, overlap the tiles (e.g. by a quarter of "
        f"{max(parts.config.patch_size)} voxels, the patch size) and discard their borders.",
        "", "### Use it", "",
        "- Fiji: install deepImageJ, then *DeepImageJ Run* → *Install model* → this zip; open a volume "
        "(z as slices) and run.",
        "- ilastik: *Neural Network Workflow* → load this zip.",
        "- napari: the bioimage.io plugin (`napari-bioimageio`) or, in Python, "
        "`bioimageio.core.predict(model=\"model.zip\", inputs=volume)`.",
        "- Check it: `bioimageio test model.zip` (bioimageio.core).", "",
        "### Compared with `lsmfm predict`", "",
        "On a patch-sized input both give the same result (the test tensors; lsmfm's tests check it). On "
        "larger volumes `lsmfm predict` blends overlapping windows with Gaussian weights and takes the "
        "percentiles from the store's ingest statistics or a subsample of the whole volume; bioimage.io "
        "consumers run the network on the image (or tiles) they are given, with the percentiles of that "
        "image. The package declares no halo because consumers pad the input by it, which would change "
        "the result at the volume's borders.",
    ]


def environment_yaml() -> str:
    """The conda environment the `pytorch_state_dict` weights need: PyTorch and MONAI."""
    import monai
    import torch

    torch_version = torch.__version__.split("+")[0]
    return ("name: lsmfm-bioimageio\nchannels:\n  - conda-forge\n  - nodefaults\ndependencies:\n"
            "  - python>=3.10\n  - pip\n"
            f"  - pytorch>={torch_version.rsplit('.', 1)[0]}\n  - pip:\n      - monai>={monai.__version__}\n")
