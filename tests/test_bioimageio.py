"""bioimage.io export: models finetuned by `lsmfm finetune` become packages that bioimageio.core's own model
test passes (offline), whose predictions equal `lsmfm predict`'s, and whose rdf.yaml states the model's
normalisation, threshold, voxel size and valid sizes."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from finetune_helpers import TINY_BACKBONE, data_overrides, write_dataset

from lsmfm.cli.main import main

pytest.importorskip("bioimageio.core", reason="needs the bioimageio extra: pip install 'lsmfm[bioimageio]'")

FAST = ["init=scratch", "shots=[2]", "seeds=[0]", "train.max_steps=4", "train.val_every=2", "train.batch_size=1",
        "train.head_steps=2", "data.patch_size=[32,32,32]", *TINY_BACKBONE]
BLOCKED = Path(__file__).with_name("blocked")
HEAVY = "deepspeed,transformers,peft,tensorboard,distributed"


def finetune(root: Path, task: str, extra: list[str]) -> Path:
    """A model folder trained by the real `lsmfm finetune TASK` (tiny, from scratch)."""
    data = write_dataset(root / "patches", n_train=2, n_eval=1, size=32)
    run = root / "run"
    assert main(["finetune", task, "--out", str(run), "--quiet", *data_overrides(data), *FAST, *extra]) == 0
    return run / "scratch" / "shots2_seed0" / "model"


@pytest.fixture(scope="module")
def segment_model(tmp_path_factory) -> Path:
    return finetune(tmp_path_factory.mktemp("seg"), "segment", ["segment.threshold=0.4", "train.max_steps=30",
                                                                 "train.val_every=10", "train.lr=3e-3"])


@pytest.fixture(scope="module")
def segment_package(segment_model, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("seg_zip") / "model.zip"
    assert main(["export", "--format", "bioimageio", str(segment_model), "--out", str(out),
                 "--author", "Ada Lovelace"]) == 0
    return out


def rdf(package: Path) -> dict:
    with zipfile.ZipFile(package) as z:
        return yaml.safe_load(z.read("rdf.yaml"))


def package_array(package: Path, name: str) -> np.ndarray:
    import io

    with zipfile.ZipFile(package) as z:
        return np.load(io.BytesIO(z.read(name)))


def core_test(package: Path) -> dict[str, str]:
    """bioimageio.core's own model test, offline; returns {check name: status}, asserting it passed."""
    from bioimageio.core import test_model

    summary = test_model(str(package))
    statuses = {d.name: d.status for d in summary.details}
    errors = [e.msg for d in summary.details for e in d.errors]
    assert summary.status == "passed", errors
    return statuses


def lsmfm_predict(model: Path, image: np.ndarray, voxel: list[float], out: Path) -> Path:
    """`lsmfm predict` on the (1, C, Z, Y, X) test input written as an ImageJ TIFF with its voxel size."""
    from lsmfm.data.synthetic.write import write_tiff

    tif = out.with_suffix(".tif")
    write_tiff(tif, image[0, 0], tuple(voxel))
    assert main(["predict", "--model", str(model), "--input", str(tif), "--out", str(out), "--quiet",
                 "--block", "64"]) == 0
    return out


def test_segment_package_passes_bioimageio_core_and_equals_lsmfm_predict(segment_model, segment_package,
                                                                         tmp_path):
    import zarr
    from bioimageio.core import predict

    statuses = core_test(segment_package)
    for weights in ("pytorch_state_dict", "torchscript"):
        assert statuses[f"Reproduce test outputs from test inputs ({weights})"] == "passed"
    config = json.loads((segment_model / "config.json").read_text())
    image = package_array(segment_package, "test_input.npy")
    assert image.dtype == np.float32 and image.shape == (1, 1, 32, 32, 32)
    ours = zarr.open_group(str(lsmfm_predict(segment_model, image, config["voxel_size"], tmp_path / "p.zarr")),
                           mode="r")
    probability, mask = np.asarray(ours["0"])[0], np.asarray(ours["labels/mask/0"])[0]
    theirs = predict(model=str(segment_package), inputs=image).members["mask"].data.to_numpy()[0, 0]
    logits = predict(model=str(segment_package), inputs=image, skip_postprocessing=True)
    np.testing.assert_allclose(torch.sigmoid(torch.from_numpy(logits.members["mask"].data.to_numpy()[0, 0])),
                               probability, atol=1e-5)
    undecided = np.abs(probability - 0.4) < 1e-5  # a rounding step away from the threshold
    assert mask.sum() > 0 and np.array_equal((theirs > 0)[~undecided], (mask > 0)[~undecided])
    assert np.array_equal(package_array(segment_package, "test_output.npy")[0, 0], mask)


def test_segment_rdf_states_the_model(segment_model, segment_package):
    config = json.loads((segment_model / "config.json").read_text())
    doc = rdf(segment_package)
    assert doc["type"] == "model" and doc["format_version"].startswith("0.5")
    (inp,), (out,) = doc["inputs"], doc["outputs"]
    ops = {p["id"]: p.get("kwargs", {}) for p in inp["preprocessing"]}
    norm = config["normalize"]
    assert ops["scale_range"] == {"axes": ["z", "y", "x"], "min_percentile": norm["lower"],
                                  "max_percentile": norm["upper"]}
    assert ops["clip"] == {"min": 0.0, "max": 1.0}
    assert [p["id"] for p in out["postprocessing"]] == ["sigmoid", "binarize", "ensure_dtype"]
    assert out["postprocessing"][1]["kwargs"] == {"threshold": 0.4} == {"threshold": config["task"]["threshold"]}
    space = [a for a in inp["axes"] if a["type"] == "space"]
    assert [a["id"] for a in space] == ["z", "y", "x"]
    assert [a["scale"] for a in space] == config["voxel_size"] and {a["unit"] for a in space} == {"micrometer"}
    assert all(a["size"]["step"] == 4 and a["size"]["min"] % 4 == 0 for a in space)  # strides 2*2
    assert doc["authors"] == [{"name": "Ada Lovelace"}] and doc["license"] == "MIT"
    assert "10.48550/arXiv.2605.26026" in {c.get("doi") for c in doc["cite"]}
    assert any(c["text"].startswith("lsmfm ") for c in doc["cite"])
    arch = doc["weights"]["pytorch_state_dict"]["architecture"]
    with zipfile.ZipFile(segment_package) as z:
        import hashlib

        assert arch["sha256"] == hashlib.sha256(z.read("network.py")).hexdigest()
        readme = z.read("README.md").decode()
    assert "## This bioimage.io package" in readme and "deepImageJ" in readme and "threshold 0.4" in readme
    assert doc["config"]["lsmfm"]["provenance"]["lsmfm_version"]


def test_packed_network_needs_neither_lsmfm_nor_transformers(segment_model, segment_package, tmp_path):
    """network.py, as a consumer imports it (a file, no lsmfm importable), rebuilds the model exactly."""
    from lsmfm.tasks.models import load_task_model

    with zipfile.ZipFile(segment_package) as z:
        z.extractall(tmp_path)
    kwargs = rdf(segment_package)["weights"]["pytorch_state_dict"]["architecture"]["kwargs"]
    x = torch.rand(1, 1, 32, 32, 32)
    torch.save(x, tmp_path / "x.pt")
    script = (
        "import importlib.util, json, sys, torch\n"
        "spec = importlib.util.spec_from_file_location('packed', 'network.py')\n"
        "mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod)\n"
        f"net = mod.LsmfmNetwork(**json.loads({json.dumps(json.dumps(kwargs))})).eval()\n"
        "net.load_state_dict(torch.load('weights.pt', weights_only=True), strict=True)\n"
        "with torch.no_grad(): torch.save(net(torch.load('x.pt')), 'y.pt')\n"
        "assert not any(m in sys.modules for m in ('lsmfm', 'transformers'))\n")
    env = {**os.environ, "PYTHONPATH": str(BLOCKED), "LSMFM_BLOCK": "lsmfm,transformers"}
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    model, _ = load_task_model(segment_model)
    with torch.no_grad():
        assert torch.equal(torch.load(tmp_path / "y.pt"), model(x))


def test_deblur_package_passes_and_maps_back_to_lsmfm_predict(tmp_path):
    import zarr
    from bioimageio.core import predict

    model = finetune(tmp_path / "deblur", "deblur", ["deblur.pairs=synthetic"])
    package = tmp_path / "deblur.zip"
    assert main(["export", "--format", "bioimageio", str(model), "--out", str(package)]) == 0
    core_test(package)
    doc = rdf(package)
    assert "postprocessing" not in doc["outputs"][0] or [p["id"] for p in doc["outputs"][0]["postprocessing"]] \
        == ["ensure_dtype"]
    image = package_array(package, "test_input.npy")
    config = json.loads((model / "config.json").read_text())
    restored = np.asarray(zarr.open_group(str(lsmfm_predict(model, image, config["voxel_size"],
                                                            tmp_path / "p.zarr")), mode="r")["0"])[0]
    theirs = predict(model=str(package), inputs=image).members["restored"].data.to_numpy()[0, 0]
    lo, hi = np.percentile(image, [config["normalize"]["lower"], config["normalize"]["upper"]])
    np.testing.assert_allclose(theirs * (hi - lo) + lo, restored, rtol=1e-4, atol=1e-4 * (hi - lo))
    assert not np.allclose(theirs, np.clip((image[0, 0] - lo) / (hi - lo), 0, 1), atol=1e-6)  # it did learn


@pytest.mark.slow
def test_swinunetr_is_traced_at_its_patch_size(tmp_path):
    from lsmfm.models.backbones.swinunetr import SwinUNETRConfig
    from lsmfm.tasks.models import build_task_model, save_task_model
    from lsmfm.weights.format import ModelConfig

    torch.manual_seed(0)
    backbone = SwinUNETRConfig(feature_size=12, out_channels=12)
    model = build_task_model("segment", backbone.build())
    save_task_model(model, tmp_path / "model", ModelConfig(backbone=backbone, patch_size=[32, 32, 32]))
    package = tmp_path / "swin.zip"
    assert main(["export", "--format", "bioimageio", str(tmp_path / "model"), "--out", str(package)]) == 0
    core_test(package)
    space = [a for a in rdf(package)["inputs"][0]["axes"] if a["type"] == "space"]
    assert [a["size"] for a in space] == [32, 32, 32] and all("unit" not in a for a in space)


def test_export_refusals_are_one_line(segment_model, segment_package, tmp_path, capsys):
    from lsmfm.models.backbones.unet import UNetConfig
    from lsmfm.tasks.models import build_task_model, save_task_model
    from lsmfm.weights.format import ModelConfig

    backbone = UNetConfig(channels=[8, 16], strides=[2], out_channels=8)
    save_task_model(build_task_model("classify", backbone.build(), {"n_classes": 2}), tmp_path / "cls",
                    ModelConfig(backbone=backbone, patch_size=[16, 16, 16]), class_names=["a", "b"])
    cases = [([str(tmp_path / "cls"), "--out", str(tmp_path / "c.zip")], "is a classify model"),
             ([str(segment_model), "--out", str(segment_package)], "already exists"),
             ([str(segment_model), "--out", str(tmp_path / "m.tar")], "is a .zip file"),
             ([str(segment_model), "--out", str(tmp_path / "n.zip"), "--test-input", str(tmp_path / "no.tif")],
              "no.tif"),
             ([str(segment_model), "--out", str(tmp_path / "n.zip"), "--license", "MIT-ish"],
              "not an SPDX licence identifier"),
             ([str(segment_model), "--out", str(tmp_path / "n.zip"), "--name", "a/b"], "--name 'a/b'")]
    for argv, problem in cases:
        assert main(["export", "--format", "bioimageio", *argv]) == 1
        err = capsys.readouterr().err.strip()
        assert problem in err and len(err.splitlines()) == 1, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cls"]


@pytest.mark.slow
def test_light_install_finetunes_predicts_and_exports_without_heavy_extras(tmp_path):
    """What `pip install 'lsmfm[bioimageio]'` without train/text/baselines/cluster runs: deepspeed,
    transformers, peft, tensorboard and distributed all fail to import in this process."""
    data = write_dataset(tmp_path / "patches", n_train=2, n_eval=1, size=32)
    model = tmp_path / "run" / "scratch" / "shots2_seed0" / "model"
    vol = tmp_path / "vol.tif"
    from lsmfm.data.synthetic.write import write_tiff

    write_tiff(vol, np.random.default_rng(0).gamma(2.0, 100.0, (40, 40, 40)).astype(np.float32), (2.0, 1.0, 1.0))
    steps = [["finetune", "segment", "--out", str(tmp_path / "run"), "--quiet", *data_overrides(data), *FAST],
             ["predict", "--model", str(model), "--input", str(vol), "--out", str(tmp_path / "p.zarr"), "--quiet"],
             ["export", "--format", "bioimageio", str(model), "--out", str(tmp_path / "m.zip")]]
    env = {**os.environ, "PYTHONPATH": str(BLOCKED), "LSMFM_BLOCK": HEAVY}
    check = "import sys; sys.argv = ['lsmfm', *sys.argv[1:]]; from lsmfm.cli.main import main; rc = main(); " \
            f"loaded = [m for m in {HEAVY.split(',')!r} if m in sys.modules]; assert not loaded, loaded; sys.exit(rc)"
    for argv in steps:
        done = subprocess.run([sys.executable, "-c", check, *argv], env=env, capture_output=True, text=True,
                              timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        if argv[0] == "finetune":
            assert "TensorBoard logging needs tensorboard" in done.stderr and "lsmfm[train]" in done.stderr
    assert (tmp_path / "p.zarr" / "labels" / "mask").is_dir() and zipfile.is_zipfile(tmp_path / "m.zip")


@pytest.mark.parametrize("argv, extra", [
    (["export", "--format", "bioimageio", "MODEL", "--out", "m.zip"], "bioimageio"),
    (["pretrain", "--out", "run", "train.max_steps=1"], "train"),
])
def test_a_missing_extra_is_one_line_naming_it(argv, extra, segment_model, tmp_path):
    argv = [str(segment_model) if a == "MODEL" else str(tmp_path / a) if a in ("m.zip", "run") else a
            for a in argv]
    env = {**os.environ, "PYTHONPATH": str(BLOCKED), "LSMFM_BLOCK": f"{HEAVY},bioimageio"}
    done = subprocess.run([sys.executable, "-m", "lsmfm.cli.main", *argv], env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 1, done.stderr[-2000:]
    assert done.stderr.strip().splitlines()[-1].endswith(f"pip install 'lsmfm[{extra}]'"), done.stderr[-2000:]
    assert "Traceback" not in done.stderr


def test_the_packed_network_file_imports_only_torch_and_monai():
    import ast

    tree = ast.parse(Path(importlib.util.find_spec("lsmfm.bioimageio.network").origin).read_text())
    imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert imported == {"__future__", "sys", "typing", "torch", "monai"}


def test_a_paper_model_trained_on_xyz_arrays_packs_with_its_axis_order(tmp_path):
    """The paper's finetuned network transposes at its boundary (backbone.axes: xyz); the packed
    network.py does the same, so the package computes what lsmfm and the paper's module compute."""
    import dataclasses

    from paper_fixtures import write_paper_finetuned_ckpt, write_paper_pretraining_ckpt

    from lsmfm.bioimageio.package import _parts, packed_network
    from lsmfm.tasks.models import load_task_model, save_task_model

    ckpt = write_paper_finetuned_ckpt(tmp_path, write_paper_pretraining_ckpt(tmp_path / "pre", "unet", False))
    model, config = load_task_model(ckpt)
    folder = save_task_model(model, tmp_path / "model", dataclasses.replace(config, patch_size=[16, 16, 16]))
    package = tmp_path / "paper.zip"
    assert main(["export", "--format", "bioimageio", str(folder), "--out", str(package)]) == 0
    core_test(package)
    assert rdf(package)["weights"]["pytorch_state_dict"]["architecture"]["kwargs"]["axes"] == "xyz"
    x = torch.rand(1, 1, 16, 8, 12)
    with torch.no_grad():
        assert torch.equal(packed_network(_parts(folder))(x), model(x))
