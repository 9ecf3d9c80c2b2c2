"""Checkpoints exactly as the LSM foundation model paper's code writes them (`paper_fixtures`: a real
pytorch-lightning Trainer.fit on MONAI MetaTensors with its callbacks, key names and hyper_parameters)
load in one line: all four variants (UNet/SwinUNETR x image+text/image-only) and a finetuned model, with
the exact tensors, the automatic encoder choice from the teacher's untrained BatchNorm statistics, the
(x, y, z) axis order applied at the boundary (tested against the raw MONAI network), and a pickle that
runs code refused without a side effect."""

from __future__ import annotations

import dataclasses
import json
import os
import re
from pathlib import Path
from typing import Any

import pytest
import torch
from paper_fixtures import write_paper_finetuned_ckpt, write_paper_pretraining_ckpt

import lsmfm
from lsmfm.errors import LsmfmNotice, LsmfmWarning
from lsmfm.weights.paper import batchnorm_state
from lsmfm.weights.torchfile import UnsafeCheckpointError

VARIANTS = [
    ("unet", True),
    ("unet", False),
    pytest.param("swinunetr", True, marks=pytest.mark.slow),
    pytest.param("swinunetr", False, marks=pytest.mark.slow),
]


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory) -> dict[tuple[str, bool], Path]:
    """Checkpoints written on first use, one per variant."""
    root = tmp_path_factory.mktemp("paper")

    class Lazy(dict):
        def __missing__(self, key: tuple[str, bool]) -> Path:
            arch, text = key
            self[key] = write_paper_pretraining_ckpt(root / f"{arch}_{text}", arch, text)
            return self[key]

    return Lazy()


def trusted(path: Path) -> dict:
    """The file as the paper's own scripts read it (`weights_only=False`): for reference values only."""
    return torch.load(path, map_location="cpu", weights_only=False)


def encoder(sd: dict, which: str) -> dict:
    prefix = f"{which}_encoder."
    return {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}


def raw_network(arch: str, hp: dict, state: dict) -> torch.nn.Module:
    """The MONAI network the paper builds, with the checkpoint's weights."""
    from paper_fixtures import _encoder

    net = _encoder(arch, hp)
    net.load_state_dict(state)
    return net.eval()


def test_the_fixture_is_what_the_paper_writes(ckpts):
    """Lightning's callbacks hold MetaTensors with MONAI's trace of the load transforms: plain
    weights-only loading refuses such a file, lsmfm's allowlist reads it."""
    from monai.data import MetaTensor

    path = ckpts["unet", True]
    obj = trusted(path)
    assert {"state_dict", "hyper_parameters", "callbacks", "optimizer_states", "loops"} <= set(obj)
    scores = [
        v
        for state in obj["callbacks"].values()
        for k, v in state.items()
        if k in ("best_model_score", "best_score")
    ]
    assert len(scores) == 2 and all(isinstance(s, MetaTensor) for s in scores)
    assert any(op.get("class") == "ToTensord" for op in scores[0].applied_operations)
    with pytest.raises(Exception, match="MetaTensor|Unsupported global"):
        torch.load(path, weights_only=True)
    sd = obj["state_dict"]
    assert {k.split(".")[0] for k in sd} == {
        "student_encoder",
        "teacher_encoder",
        "reconstruction_head",
        "ema_decay",
        "text_encoder",
        "text_proj",
        "image_proj",
        "logit_scale",
    }
    assert batchnorm_state(encoder(sd, "teacher")) == "untrained"  # eval mode + EMA of parameters only
    assert batchnorm_state(encoder(sd, "student")) == "trained"


@pytest.mark.parametrize("arch,text", VARIANTS)
def test_each_variant_loads_exactly_with_the_automatic_choice(ckpts, arch, text):
    path = ckpts[arch, text]
    obj = trusted(path)
    which = "student" if arch == "unet" else "teacher"
    why = "never updated" if arch == "unet" else "has no BatchNorm"
    with pytest.warns(LsmfmNotice, match=f"using the {which} encoder \\(auto: .*{why}"):
        net = lsmfm.load_pretrained(path)
    expected = encoder(obj["state_dict"], which)
    got = net.state_dict()
    assert sorted(got) == sorted(expected) and all(torch.equal(got[k], expected[k]) for k in expected)
    c = net.lsmfm_config
    model_hp = obj["hyper_parameters"]["model"]
    assert c.backbone.axes == "xyz" and c.backbone.out_channels == model_hp["embed_dim"]
    if arch == "swinunetr":
        assert c.backbone.feature_size == model_hp["swinunetr"]["feature_size"]  # inferred from tensors
    network = obj["hyper_parameters"]["data"]["downsample"]["target_size"]
    assert c.patch_size == [network] * 3
    assert c.pretraining["resize"] == {"read": [12] * 3, "network": [network] * 3}
    assert c.pretraining["which"] == which and c.pretraining["mode"] == (
        "image_text" if text else "image_only"
    )
    assert (c.normalize.lower, c.normalize.upper, c.normalize.clip) == (1.0, 99.0, True)
    assert c.pretraining["data"] == ["wu"]


def test_teacher_and_student_on_request(ckpts, recwarn):
    path = ckpts["unet", False]
    sd = trusted(path)["state_dict"]
    with pytest.warns(LsmfmWarning, match="teacher's BatchNorm statistics are at their initial values"):
        teacher = lsmfm.load_pretrained(path, which="teacher")
    student = lsmfm.load_pretrained(path, which="student")
    for net, which in ((teacher, "teacher"), (student, "student")):
        expected = encoder(sd, which)
        assert all(torch.equal(net.state_dict()[k], v) for k, v in expected.items())
        assert net.lsmfm_config.pretraining["which"] == which
    saved = student.save_pretrained(Path(path).parent / "converted")
    again = lsmfm.load_pretrained(saved)
    assert again.lsmfm_config.pretraining["which"] == "student" and again.config.axes == "xyz"


@pytest.mark.parametrize("arch", ["unet", pytest.param("swinunetr", marks=pytest.mark.slow)])
def test_axis_order_matches_the_raw_monai_network_on_the_permuted_input(ckpts, arch):
    """lsmfm's (z, y, x) array through the loaded model = the paper's network on the same volume in
    nibabel's (x, y, z) order; without the recorded axes the output would differ."""
    path = ckpts[arch, True]
    obj = trusted(path)
    net = lsmfm.load_pretrained(path)
    which = net.lsmfm_config.pretraining["which"]
    raw = raw_network(arch, obj["hyper_parameters"], encoder(obj["state_dict"], which))
    shape_xyz = (1, 1, 8, 12, 16) if arch == "unet" else (1, 1, 32, 64, 96)
    vol_xyz = torch.rand(*shape_xyz, generator=torch.Generator().manual_seed(0))
    vol_zyx = vol_xyz.permute(0, 1, 4, 3, 2).contiguous()
    with torch.no_grad():
        want = raw(vol_xyz).permute(0, 1, 4, 3, 2)
        got = net(vol_zyx)
        assert got.shape == (1, net.config.out_channels, *vol_zyx.shape[2:])
        assert torch.equal(got, want)
        net.config = dataclasses.replace(net.config, axes="zyx")
        assert not torch.allclose(net(vol_zyx), want, atol=1e-3)


def test_finetuned_checkpoint_predicts_what_the_paper_module_does(ckpts, tmp_path):
    from lsmfm.tasks.models import load_task_model

    pretrained = ckpts["unet", True]
    path = write_paper_finetuned_ckpt(tmp_path, pretrained)
    obj = trusted(path)
    assert all(k.startswith("model.model.") for k in obj["state_dict"])
    model, config = load_task_model(path)
    assert config.task["name"] == "segment" and config.backbone.axes == "xyz"
    assert config.backbone.out_channels == 1  # inferred from the tensors
    hp = obj["hyper_parameters"]
    raw = raw_network(
        "unet",
        {
            "model": {
                "embed_dim": 1,
                "unet": {
                    "channels": hp["channels"],
                    "strides": hp["strides"],
                    "num_res_units": hp["num_res_units"],
                    "norm": hp["norm"],
                },
            }
        },
        {k[len("model.") :]: v for k, v in obj["state_dict"].items()},
    )
    vol_xyz = torch.rand(2, 1, 12, 8, 10, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(model(vol_xyz.permute(0, 1, 4, 3, 2)), raw(vol_xyz).permute(0, 1, 4, 3, 2))
    backbone = lsmfm.load_pretrained(path)  # the finetuned network itself, as from a finetuned folder
    assert backbone.config == config.backbone


def test_finetuned_deblurring_checkpoint_restores_what_the_paper_module_does(ckpts, tmp_path):
    """The paper's UNet deblurring finetuning (hyper-parameters `unet_*`, `edge_weight`): read as a deblur
    model whose output is the blurred input plus the raw network's residual, in (x, y, z) order."""
    from lsmfm.tasks.models import load_task_model

    path = write_paper_finetuned_ckpt(tmp_path, ckpts["unet", False], task="deblur")
    obj = trusted(path)
    hp = obj["hyper_parameters"]
    model, config = load_task_model(path)
    assert (config.task["name"], config.backbone.axes, config.backbone.out_channels) == ("deblur", "xyz", 1)
    unet = {"channels": hp["unet_channels"], "strides": hp["unet_strides"],
            "num_res_units": hp["unet_num_res_units"], "norm": hp["unet_norm"]}
    raw = raw_network("unet", {"model": {"embed_dim": 1, "unet": unet}},
                      {k[len("model.") :]: v for k, v in obj["state_dict"].items()})
    blurred_xyz = torch.rand(2, 1, 12, 8, 16, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        residual = raw(blurred_xyz)
        assert residual.abs().max() > 1e-3  # a residual that matters
        want = (blurred_xyz + residual).permute(0, 1, 4, 3, 2)
        assert torch.allclose(model(blurred_xyz.permute(0, 1, 4, 3, 2)), want, atol=1e-6)


@pytest.mark.slow
def test_finetuned_swinunetr_checkpoint_predicts_what_the_paper_module_does(ckpts, tmp_path):
    """The paper's SwinUNETR segmentation finetuning (`model.*`, out_channels 1, feature size of its
    hyper_parameters): its architecture is read from the tensors, and `lsmfm predict` on lsmfm's (z, y, x)
    volume writes the sigmoid of the raw network's sliding window over the same volume in (x, y, z)."""
    import nibabel as nib
    import numpy as np
    import zarr
    from monai.inferers import sliding_window_inference
    from monai.networks.nets import SwinUNETR

    from lsmfm.cli.main import main
    from lsmfm.data.normalize import percentile_normalize
    from lsmfm.tasks.models import load_task_model
    from lsmfm.weights.paper import PAPER_NORMALIZE

    path = write_paper_finetuned_ckpt(tmp_path, ckpts["swinunetr", False], arch="swinunetr")
    obj = trusted(path)
    hp = obj["hyper_parameters"]
    model, config = load_task_model(path)
    assert (config.backbone.arch, config.backbone.axes, config.patch_size) == ("swinunetr", "xyz", [64] * 3)
    assert (config.backbone.out_channels, config.backbone.feature_size) == (1, hp["feature_size"])
    raw = SwinUNETR(in_channels=1, out_channels=1, feature_size=hp["feature_size"]).eval()
    raw.load_state_dict({k[len("model.") :]: v for k, v in obj["state_dict"].items()})
    rng = np.random.default_rng(0)
    volume = rng.gamma(2.0, 50.0, (64, 48, 80)).astype(np.float32)  # (z, y, x)
    src = tmp_path / "vol.nii.gz"
    nib.save(nib.Nifti1Image(volume.transpose(2, 1, 0), np.eye(4)), str(src))  # nibabel: (x, y, z)
    out = tmp_path / "pred.zarr"
    assert main(["predict", "--model", str(path), "--input", str(src), "--out", str(out), "--block", "64",
                 "--quiet", "--json", str(tmp_path / "s.json")]) == 0
    bounds = json.loads((tmp_path / "s.json").read_text())["bounds"][0]
    x = torch.from_numpy(percentile_normalize(volume, PAPER_NORMALIZE, tuple(bounds)))[None, None]
    with torch.no_grad():
        want = sliding_window_inference(x, [64] * 3, 1, lambda w: raw(w.permute(0, 1, 4, 3, 2)).permute(
            0, 1, 4, 3, 2), overlap=0.25, mode="gaussian")
    np.testing.assert_allclose(zarr.open_array(str(out / "0"), mode="r")[:], torch.sigmoid(want)[0].numpy(),
                               atol=1e-5)


def _payloads(marker: Path) -> dict[str, tuple[Any, tuple[Any, ...]]]:
    """Callables a pickle can call on load, each creating `marker`."""
    import builtins
    import subprocess

    return {"posix.system": (os.system, (f"touch {marker}",)),
            "builtins.exec": (builtins.exec, (f"open({str(marker)!r}, 'w').close()",)),
            "subprocess.Popen": (subprocess.Popen, (["touch", str(marker)],))}


@pytest.mark.parametrize("name", ["posix.system", "builtins.exec", "subprocess.Popen"])
@pytest.mark.parametrize("where", ["callback", "metatensor"])
def test_a_code_pickle_in_a_paper_checkpoint_is_refused_without_side_effect(ckpts, tmp_path, name, where):
    """Any callable, in a callback's state or inside the trace of an allowed MetaTensor: refused by name."""
    marker = tmp_path / "pwned"
    call = _payloads(marker)[name]

    class Payload:
        def __reduce__(self):
            return call

    obj = trusted(ckpts["unet", True])
    if where == "callback":
        obj["callbacks"]["EvilCallback"] = {"state": Payload()}
    else:
        score = next(s for s in obj["callbacks"].values() if "best_model_score" in s)["best_model_score"]
        score.applied_operations.append({"class": Payload()})
    path = tmp_path / "unet_image_text_best.ckpt"
    torch.save(obj, path)
    with pytest.raises(UnsafeCheckpointError, match=rf"unet_image_text_best\.ckpt: refused.*{re.escape(name)}"):
        lsmfm.load_pretrained(path)
    assert not marker.exists()
