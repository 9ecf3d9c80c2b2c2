"""The LSM foundation model paper's checkpoint layout, unit by unit: encoder choice, shape inference at the
released widths, hyper_parameters, refusals.

These tests write the layout by hand (two encoders with different trained-looking weights); the
checkpoints the paper's own code writes (a real Lightning Trainer.fit on MONAI MetaTensors) are tested
in `tests/test_paper_lightning.py`.
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest
import torch

import lsmfm
from lsmfm.errors import InputError
from lsmfm.models.backbones.registry import BackboneConfig, build_backbone
from lsmfm.models.backbones.swinunetr import SwinUNETRConfig
from lsmfm.models.backbones.unet import UNetConfig
from lsmfm.provenance import provenance
from lsmfm.weights.registry import RELEASES, check_arch

TINY_UNET = UNetConfig(channels=[4, 8, 16], strides=[2, 2], out_channels=8)
TINY_SWIN = SwinUNETRConfig(feature_size=12, out_channels=16, norm="instance")


def paper_state(cfg: BackboneConfig, text: bool = True, seed: int = 0) -> dict[str, torch.Tensor]:
    """A pretraining module's state dict: two encoders with different weights, text parts, heads."""
    torch.manual_seed(seed)
    student = build_backbone(cfg).state_dict()
    teacher = {k: v + 1 if v.is_floating_point() else v.clone() for k, v in student.items()}
    sd = {f"student_encoder.{k}": v for k, v in student.items()}
    sd |= {f"teacher_encoder.{k}": v for k, v in teacher.items()}
    sd |= {"reconstruction_head.decoder.0.weight": torch.randn(4, cfg.out_channels, 3, 3, 3),
           "ema_decay": torch.tensor(0.996)}
    if text:
        sd |= {"text_encoder.embeddings.word_embeddings.weight": torch.randn(30, 8),
               "text_proj.0.weight": torch.randn(cfg.out_channels, 8),
               "image_proj.2.weight": torch.randn(4, 4),
               "logit_scale": torch.tensor(2.3)}
    return sd


def write_paper_ckpt(path: Path, cfg: BackboneConfig = TINY_UNET, text: bool = True,
                     hp: dict | None = None) -> dict[str, torch.Tensor]:
    """Save a checkpoint in the paper's Lightning layout; returns its state_dict."""
    sd = paper_state(cfg, text)
    torch.save({"state_dict": sd, "epoch": 7, "global_step": 350, "pytorch-lightning_version": "2.5.1",
                "hyper_parameters": hp or {}, "optimizer_states": [{"state": {}, "param_groups": []}],
                "lr_schedulers": [],
                "callbacks": {"ModelCheckpoint": {"best_model_score": torch.tensor(0.5)}}},
               path)
    return sd


def encoder(sd: dict[str, torch.Tensor], which: str) -> dict[str, torch.Tensor]:
    prefix = f"{which}_encoder."
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


def assert_same_state(net: torch.nn.Module, expected: dict[str, torch.Tensor]) -> None:
    got = net.state_dict()
    assert sorted(got) == sorted(expected)
    assert all(torch.equal(got[k], expected[k]) for k in expected)


@pytest.mark.parametrize("cfg", [TINY_UNET, TINY_SWIN], ids=["unet", "swinunetr"])
def test_trained_teacher_by_default_student_on_request(tmp_path, cfg):
    path = tmp_path / "tiny_best.ckpt"
    sd = write_paper_ckpt(path, cfg)
    teacher = lsmfm.load_pretrained(path)
    student = lsmfm.load_pretrained(path, which="student")
    assert_same_state(teacher, encoder(sd, "teacher"))
    assert_same_state(student, encoder(sd, "student"))
    assert not teacher.training
    c = teacher.lsmfm_config
    assert c.backbone == dataclasses.replace(cfg, axes="xyz")
    assert c.pretraining["which"] == "teacher" and student.lsmfm_config.pretraining["which"] == "student"
    assert c.pretraining["mode"] == "image_text" and c.pretraining["epoch"] == 7
    assert (c.patch_size, c.normalize.lower, c.normalize.upper) == ([64, 64, 64], 1.0, 99.0)
    if cfg.arch == "unet":
        with torch.no_grad():
            assert teacher.embed(torch.rand(1, 1, 32, 32, 32)).shape == (1, cfg.out_channels)


def test_paper_width_unet_shapes_are_inferred(tmp_path):
    """Channels 32-512, strides 2-2-2-1, 2 residual units, BatchNorm, embedding 128: the released UNets."""
    cfg = UNetConfig(channels=[32, 64, 128, 256, 512], strides=[2, 2, 2, 1], num_res_units=2,
                     norm="batch", out_channels=128)
    path = tmp_path / "unet_image_only_best.ckpt"
    sd = write_paper_ckpt(path, cfg, text=False)
    net = lsmfm.load_pretrained(path)
    assert net.lsmfm_config.backbone == dataclasses.replace(cfg, axes="xyz")
    assert net.lsmfm_config.pretraining["mode"] == "image_only"
    check_arch(RELEASES["unet_image_only"], net.config, path)
    assert_same_state(net, encoder(sd, "teacher"))
    assert sum(p.numel() for p in net.parameters()) == 19_030_321  # MONAI 1.4 and 1.6 alike
    converted = net.save_pretrained(tmp_path / "converted")  # the paper's weights in our format
    again = lsmfm.load_pretrained(converted)
    assert_same_state(again, encoder(sd, "teacher"))
    assert again.lsmfm_config == dataclasses.replace(net.lsmfm_config, provenance=provenance())


def test_paper_width_swinunetr_36_is_inferred(tmp_path):
    cfg = SwinUNETRConfig(feature_size=36, out_channels=512, norm="instance")
    path = tmp_path / "swinunetr_image_text_best.ckpt"
    sd = write_paper_ckpt(path, cfg)
    net = lsmfm.load_pretrained(path, which="student")
    check_arch(RELEASES["swinunetr_image_text"], net.config, path)
    assert_same_state(net, encoder(sd, "student"))
    assert sum(p.numel() for p in net.parameters()) == 35_091_422
    with pytest.raises(InputError, match="feature_size is 36 in the file but 24 in the registry"):
        check_arch(RELEASES["swinunetr_image_only"], net.config, path)


def test_hyper_parameters_are_used_and_checked(tmp_path):
    hp = {"model": {"embed_dim": 8, "use_text": True, "unet": {"strides": [2, 2]}},
          "data": {"enable": {"wu": True, "selma": False, "human2": True},
                   "downsample": {"enabled": False}, "base_patch_size": 96}}
    path = tmp_path / "a.ckpt"
    write_paper_ckpt(path, hp=hp)
    c = lsmfm.load_pretrained(path).lsmfm_config
    assert c.patch_size == [96, 96, 96] and c.pretraining["data"] == ["wu", "human2"]
    hp["model"]["embed_dim"] = 128
    write_paper_ckpt(path, hp=hp)
    with pytest.raises(InputError, match="embed_dim 128, but the weights have 8"):
        lsmfm.load_pretrained(path)


def test_pickle_carrying_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": paper_state(TINY_UNET), "hyper_parameters": Payload()}, path)
    with pytest.raises(InputError, match=r"evil\.ckpt: refused.*system"):
        lsmfm.load_pretrained(path)
    assert not marker.exists()


def test_truncated_and_foreign_files_are_refused(tmp_path):
    path = tmp_path / "good.ckpt"
    write_paper_ckpt(path)
    cut = tmp_path / "cut.ckpt"
    cut.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(InputError, match=r"cut\.ckpt: not a readable PyTorch checkpoint"):
        lsmfm.load_pretrained(cut)
    plain = tmp_path / "plain.pt"
    torch.save(build_backbone(TINY_UNET).state_dict(), plain)
    with pytest.raises(InputError, match="not a checkpoint in the paper's layout"):
        lsmfm.load_pretrained(plain)
    only_student = tmp_path / "student.ckpt"
    student_only = {k: v for k, v in paper_state(TINY_UNET).items() if "teacher" not in k}
    torch.save({"state_dict": student_only}, only_student)
    with pytest.raises(InputError, match="no teacher_encoder.* keys .*student_encoder"):
        lsmfm.load_pretrained(only_student)


def test_mismatching_weights_list_the_keys(tmp_path):
    """A layer of another width and a missing tensor: the load fails strictly, naming both."""
    sd = paper_state(TINY_UNET)
    sd["teacher_encoder.model.1.submodule.0.conv.unit1.conv.weight"] = torch.zeros(8, 16, 3, 3, 3)
    del sd["teacher_encoder.model.2.1.conv.unit0.conv.bias"]
    path = tmp_path / "bad.ckpt"
    torch.save({"state_dict": sd}, path)
    with pytest.raises(InputError) as err:
        lsmfm.load_pretrained(path)
    msg = str(err.value)
    assert msg.startswith(f"{path}: weights do not fit the unet")
    assert "missing 1: model.2.1.conv.unit0.conv.bias" in msg and "unexpected" not in msg
    assert "shape mismatch 1: model.1.submodule.0.conv.unit1.conv.weight (file (8, 16, 3, 3, 3), " \
           "model (8, 8, 3, 3, 3))" in msg


def test_instance_norm_swinunetr_needs_two_voxels_at_its_bottleneck():
    """The paper's SwinUNETRs (instance norm) cannot run on 32³: torch refuses to normalise the one voxel
    left at 1/32, in eval mode too. Said in one line before any work; batch norm and 32 x 32 x 64 run."""
    from lsmfm.config import load_config
    from lsmfm.errors import ConfigError
    from lsmfm.training.pretrain import PretrainConfig

    net = TINY_SWIN.build().eval()
    with torch.no_grad():
        with pytest.raises(ValueError, match=r"\(32, 32, 32\) gives the network .* one at its 1/32 bottle"):
            net(torch.rand(1, 1, 32, 32, 32))
        assert net(torch.rand(1, 1, 32, 32, 64)).shape == (1, 16, 32, 32, 64)
    assert dataclasses.replace(TINY_SWIN, norm="batch").size_problem([32] * 3) is None
    scaled = dataclasses.replace(TINY_SWIN, input_scale=0.5)
    assert "gives the network [32, 32, 32] voxels" in scaled.size_problem([64] * 3)
    overrides = ["model.backbone={arch: swinunetr, feature_size: 12, norm: instance}",
                 "data.patch_size=[32,32,32]", "model.masking.block_sizes=[8]"]
    with pytest.raises(ConfigError, match=r"data.patch_size \[32, 32, 32\] gives the network"):
        load_config(PretrainConfig, None, overrides)
