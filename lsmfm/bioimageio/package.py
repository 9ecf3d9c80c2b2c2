"""`lsmfm export --format bioimageio MODEL_DIR --out model.zip`: a finetuned dense model as a bioimage.io
package, for deepImageJ (Fiji), ilastik, QuPath, napari and `bioimageio.core`.

The package (current bioimage.io model spec, validated by `bioimageio.spec` before it is written):
- weights: `pytorch_state_dict` whose architecture is `network.py` (lsmfm/bioimageio/network.py, packed
  with its sha256: torch and MONAI only, no lsmfm needed), and TorchScript (scripted UNets accept every
  valid size; other networks are traced at the patch size, which then is the only input size);
- axes batch, channel, z, y, x with the model's voxel size in µm; spatial sizes `n * step` with step
  the network's size multiple. No halo is declared: a consumer given the whole volume then computes
  exactly what `lsmfm predict` does on a patch (bioimage.io consumers pad inputs by a declared halo, and
  the borders would differ); tiled consumers choose their own overlap;
- preprocessing: the model's recorded normalisation (`scale_range` between its percentiles per channel
  and sample, then `clip` to [0, 1] when it clips); postprocessing for masks: `sigmoid`, then
  `binarize` at the recorded threshold (uint8);
- test input and output (patch-sized; the output is what `lsmfm predict` writes for that input), a
  cover, documentation (the model card plus how to use the package), citations, licence, the lsmfm
  config.json and provenance.
"""
from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lsmfm.errors import ConfigError, InputError
from lsmfm.extras import require

NETWORK_SOURCE = Path(__file__).with_name("network.py")
NETWORK_CALLABLE = "LsmfmNetwork"


@dataclass(frozen=True)
class PackageOptions:
    """What a package says beyond the model folder.

    Args:
        name: the package name (letters, digits, spaces, `_+-()`); None: from the task and network.
        authors: who trained the model (at least one; None: the login name).
        license: SPDX identifier of the weights' licence.
        test_input: a volume whose centre patch is the test input; None: a synthetic light-sheet volume.
    """

    name: str | None = None
    authors: tuple[str, ...] = ()
    license: str = "MIT"
    test_input: str | Path | None = None


@dataclass
class Parts:
    """The model and everything derived from it that the rdf.yaml describes."""

    model: Any
    config: Any
    output: Any  # tasks.base.BioimageioOutput
    threshold: float | None
    network: tuple[str, dict[str, Any]]
    scripted: bool


def export_bioimageio(model_dir: str | Path, out: str | Path, opts: PackageOptions = PackageOptions(),
                      overwrite: bool = False) -> Path:
    """Write the bioimage.io package of a finetuned model folder to `out` (a .zip), atomically."""
    from lsmfm.bioimageio.docs import check_name
    from lsmfm.bioimageio.tensors import make_test_input, make_test_output
    from lsmfm.io.atomic import atomic_path
    from lsmfm.io.lock import output_lock

    spec = require("bioimageio.spec", "bioimageio", "bioimage.io export")
    target = Path(out)
    if target.suffix != ".zip":
        raise InputError(target, "a bioimage.io package is a .zip file; name --out like model.zip")
    if target.exists() and not overwrite:
        raise InputError(target, "already exists; choose another --out or pass --overwrite")
    check_name(opts.name)
    _check_license(opts.license)
    parts = _parts(model_dir)
    image = make_test_input(parts.config, opts.test_input)
    expected = make_test_output(parts.model, parts.config, image, parts.threshold)
    with output_lock(target), tempfile.TemporaryDirectory(prefix="lsmfm-bioimageio-") as work:
        folder = Path(work)
        parts.scripted = _write_weights(folder, parts, image)
        _write_files(folder, Path(model_dir), parts, image, expected)
        rdf = rdf_content(parts, opts)
        descr = _validated(spec, rdf, folder)
        with atomic_path(target) as tmp:
            spec.save_bioimageio_package(descr, output_path=tmp)
    return target


def _check_license(license_id: str) -> None:
    from bioimageio.spec.model.v0_5 import LicenseId

    try:
        LicenseId(license_id)
    except ValueError as exc:
        raise ConfigError(f"--license {license_id!r}: not an SPDX licence identifier "
                          "(https://spdx.org/licenses/), e.g. MIT, CC-BY-4.0, BSD-3-Clause") from exc


def _parts(model_dir: str | Path) -> Parts:
    from lsmfm.tasks.models import load_task_model

    model, config = load_task_model(model_dir)
    output = model.spec.bioimageio_output(config.task, model.head_config, config.backbone.in_channels)
    problem = model.spec.predict_problem(model.head_config)
    if output is None or problem is not None:
        raise InputError(model_dir, problem or f"is a {model.task} model; bioimage.io export writes dense "
                                               "models (segment, deblur)")
    network = config.backbone.monai_network()
    if network is None:
        raise InputError(model_dir, f"its {config.backbone.arch} backbone is not a MONAI network; the "
                                    "bioimage.io package rebuilds UNet and SwinUNETR backbones only")
    if config.backbone.input_scale != 1.0:
        raise InputError(model_dir, f"resizes its input by {config.backbone.input_scale:g} (backbone."
                                    "input_scale); bioimage.io packages are written for networks at their "
                                    "input's scale only")
    name, kwargs = network
    if "use_checkpoint" in kwargs:
        kwargs = {**kwargs, "use_checkpoint": False}  # gradient checkpointing is for training only
    threshold = float(config.task.get("threshold", 0.5)) if model.spec.volume_output == "mask" else None
    return Parts(model, config, output, threshold, (name, kwargs), scripted=False)


def packed_network(parts: Parts) -> torch.nn.Module:
    """The package's network (network.py, loaded as a consumer loads it) with the model's weights."""
    from lsmfm.bioimageio.network import LsmfmNetwork

    net = LsmfmNetwork(**network_kwargs(parts))
    net.load_state_dict(parts.model.state_dict(), strict=True)
    return net.eval()


def network_kwargs(parts: Parts) -> dict[str, Any]:
    name, kwargs = parts.network
    return {"backbone": name, "backbone_kwargs": kwargs, "head_channels": len(parts.output.channels),
            "residual": parts.output.residual, "axes": parts.config.backbone.axes}


def _write_weights(folder: Path, parts: Parts, image: np.ndarray) -> bool:
    """weights.pt (state dict) and weights.torchscript.pt; returns whether TorchScript was scripted
    (any valid size) rather than traced (the patch size only). Both are checked against the model."""
    import warnings

    net = packed_network(parts)
    torch.save({k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}, folder / "weights.pt")
    x = torch.from_numpy(np.clip((image - image.min()) / max(float(np.ptp(image)), 1e-6), 0, 1))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.jit.*deprecated.*")
        try:
            scripted, module = True, torch.jit.script(net)
        except Exception:  # noqa: BLE001 - not scriptable (SwinUNETR): trace at the patch size
            with torch.no_grad():
                scripted, module = False, torch.jit.trace(net, x)
        with torch.no_grad():
            gap = float((module(x) - parts.model(x)).abs().max())
        if gap > 1e-4:
            raise RuntimeError(f"TorchScript of the packed network differs from the model by {gap:.3g}")
        module.save(str(folder / "weights.torchscript.pt"))
    return scripted


def _write_files(folder: Path, model_dir: Path, parts: Parts, image: np.ndarray, expected: np.ndarray
                 ) -> None:
    from lsmfm.bioimageio.docs import documentation, environment_yaml
    from lsmfm.bioimageio.tensors import write_cover

    shutil.copyfile(NETWORK_SOURCE, folder / "network.py")
    np.save(folder / "test_input.npy", image)
    np.save(folder / "test_output.npy", expected)
    write_cover(folder / "cover.png", image, expected, parts.output.id)
    (folder / "README.md").write_text(documentation(model_dir, parts))
    (folder / "environment.yaml").write_text(environment_yaml())
    (folder / "config.json").write_text(parts.config.to_json())


def rdf_content(parts: Parts, opts: PackageOptions) -> dict[str, Any]:
    """The rdf.yaml as a mapping (file paths relative to the package folder)."""
    from lsmfm.bioimageio.docs import description, metadata

    return {**metadata(parts, opts), "description": description(parts),
            "inputs": [_input(parts)], "outputs": [_output(parts)], "weights": _weights(parts)}


def _space_axes(parts: Parts, size: Any) -> list[dict[str, Any]]:
    voxel = parts.config.voxel_size
    axes = []
    for i, name in enumerate("zyx"):
        axis: dict[str, Any] = {"type": "space", "id": name, "size": size(i, name)}
        if voxel is not None:
            axis.update(unit="micrometer", scale=float(voxel[i]))
        axes.append(axis)
    return axes


def _input(parts: Parts) -> dict[str, Any]:
    norm = parts.config.normalize
    m = parts.config.backbone.size_multiple
    patch = parts.config.patch_size

    def size(i: int, name: str) -> Any:
        return {"min": m, "step": m} if parts.scripted else int(patch[i])

    channels = parts.config.backbone.in_channels
    pre: list[dict[str, Any]] = [{"id": "scale_range", "kwargs": {
        "axes": ["z", "y", "x"], "min_percentile": float(norm.lower), "max_percentile": float(norm.upper)}}]
    if norm.clip:
        pre.append({"id": "clip", "kwargs": {"min": 0.0, "max": 1.0}})
    return {"id": "raw", "description": "light-sheet volume in any intensity units (normalised by the "
                                        "preprocessing)",
            "axes": [{"type": "batch"},
                     {"type": "channel", "channel_names": [f"channel{c}" for c in range(channels)]},
                     *_space_axes(parts, size)],
            "test_tensor": {"source": "test_input.npy"}, "data": {"type": "float32"},
            "preprocessing": pre}


def _output(parts: Parts) -> dict[str, Any]:
    def size(i: int, name: str) -> Any:
        return {"tensor_id": "raw", "axis_id": name}

    axes = [{"type": "batch"}, {"type": "channel", "channel_names": list(parts.output.channels)},
            *_space_axes(parts, size)]
    out: dict[str, Any] = {"id": parts.output.id, "description": parts.output.description, "axes": axes,
                           "test_tensor": {"source": "test_output.npy"}}
    if parts.threshold is None:
        out["data"] = {"type": "float32"}
    else:
        out["data"] = {"type": "uint8", "values": [0, 1]}
        out["postprocessing"] = [{"id": "sigmoid"},
                                 {"id": "binarize", "kwargs": {"threshold": parts.threshold}},
                                 {"id": "ensure_dtype", "kwargs": {"dtype": "uint8"}}]
    return out


def _weights(parts: Parts) -> dict[str, Any]:
    version = torch.__version__.split("+")[0]
    return {"pytorch_state_dict": {"source": "weights.pt", "pytorch_version": version,
                                   "architecture": {"source": "network.py", "callable": NETWORK_CALLABLE,
                                                    "kwargs": network_kwargs(parts)},
                                   "dependencies": {"source": "environment.yaml"}},
            "torchscript": {"source": "weights.torchscript.pt", "pytorch_version": version,
                            "parent": "pytorch_state_dict"}}


USER_FIELDS = {"license": "--license", "name": "--name", "authors": "--author"}


def _validated(spec: Any, rdf: dict[str, Any], folder: Path) -> Any:
    """The validated description (sha256 of every file computed). A rejected --license, --name or
    --author is the user's to fix (ConfigError); any other rejection is a bug in lsmfm."""
    context = spec.ValidationContext(root=folder, file_name="rdf.yaml", perform_io_checks=True)
    descr = spec.build_description(rdf, context=context)
    errors = descr.validation_summary.errors
    if descr.validation_summary.status == "valid-format":
        return descr
    for e in errors:
        if e.loc and e.loc[0] in USER_FIELDS:
            raise ConfigError(f"{USER_FIELDS[e.loc[0]]} {rdf[e.loc[0]]!r}: bioimage.io refuses it: "
                              f"{e.msg[:200]}")
    text = "; ".join(f"{'.'.join(map(str, e.loc))}: {e.msg}" for e in errors)
    raise RuntimeError(f"bioimage.io rejected the package lsmfm built: {text}")
