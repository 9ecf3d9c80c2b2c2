"""Weights format, every load_pretrained source, releases and their hash check, Hub mixin, docs snippet."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import re
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
import torch
from test_paper_checkpoints import TINY_UNET, assert_same_state, encoder, write_paper_ckpt

import lsmfm
from lsmfm.errors import ConfigError, InputError
from lsmfm.models.backbones.registry import build_backbone
from lsmfm.models.backbones.swinunetr import SwinUNETRBackbone
from lsmfm.models.backbones.unet import UNetBackbone, UNetConfig
from lsmfm.weights.format import ModelConfig, read_model_dir, save_model_dir
from lsmfm.weights.registry import RELEASES, Release, register_release

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def tiny_dir(tmp_path) -> tuple[Path, torch.nn.Module]:
    torch.manual_seed(0)
    net = build_backbone(TINY_UNET)
    out = net.save_pretrained(tmp_path / "model", patch_size=[32, 32, 32], voxel_size=[2.0, 1.0, 1.0],
                              pretraining={"mode": "image_only", "which": "teacher", "data": ["synthetic"]})
    return out, net


def test_round_trip_through_the_folder(tiny_dir):
    folder, net = tiny_dir
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    cfg, state = read_model_dir(folder)
    assert cfg == ModelConfig(backbone=TINY_UNET, patch_size=[32, 32, 32], voxel_size=[2.0, 1.0, 1.0],
                              pretraining={"mode": "image_only", "which": "teacher", "data": ["synthetic"]},
                              provenance=cfg.provenance)
    assert cfg.provenance["lsmfm_version"] == lsmfm.__version__  # who wrote it (tests/test_provenance.py)
    loaded = lsmfm.load_pretrained(folder)
    assert type(loaded) is UNetBackbone and not loaded.training
    assert loaded.lsmfm_config == cfg
    assert_same_state(loaded, net.state_dict())
    assert "MONAI UNet, channels 4-8-16" in (folder / "README.md").read_text()
    assert list(folder.parent.iterdir()) == [folder]  # no temporary folder left behind


def test_existing_folder_is_not_overwritten_by_accident(tiny_dir):
    folder, net = tiny_dir
    with pytest.raises(InputError, match="already exists"):
        net.save_pretrained(folder)
    net.save_pretrained(folder, overwrite=True, patch_size=[64, 64, 64])
    assert read_model_dir(folder)[0].patch_size == [64, 64, 64]


def test_config_is_validated(tiny_dir):
    folder, _ = tiny_dir
    cfg_path = folder / "config.json"
    data = json.loads(cfg_path.read_text())
    cfg_path.write_text(json.dumps({**data, "patchsize": [1, 2, 3]}))
    with pytest.raises(ConfigError, match=r"config\.json: unknown key\(s\) patchsize"):
        lsmfm.load_pretrained(folder)
    cfg_path.write_text(json.dumps({**data, "format_version": 99}))
    with pytest.raises(ConfigError, match="newer than this lsmfm reads"):
        lsmfm.load_pretrained(folder)


def test_architecture_mismatch_lists_keys(tiny_dir):
    folder, _ = tiny_dir
    cfg_path = folder / "config.json"
    data = json.loads(cfg_path.read_text())
    data["backbone"]["channels"] = [4, 8, 16, 32]
    data["backbone"]["strides"] = [2, 2, 2]
    cfg_path.write_text(json.dumps(data))
    with pytest.raises(InputError) as err:
        lsmfm.load_pretrained(folder)
    msg = str(err.value)
    assert "weights do not fit the unet" in msg and "missing" in msg and "unexpected" in msg
    assert "shape mismatch" in msg and "model.1.submodule.2.0.conv.weight (file (24, 4, 3, 3, 3)" in msg


def test_corrupt_weights_are_refused(tiny_dir):
    folder, _ = tiny_dir
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(InputError, match=r"model\.safetensors: not a readable safetensors file"):
        lsmfm.load_pretrained(folder)


def test_safetensors_file_alone_carries_its_config(tiny_dir, tmp_path):
    folder, net = tiny_dir
    assert_same_state(lsmfm.load_pretrained(folder / "model.safetensors"), net.state_dict())
    lone = tmp_path / "lone" / "weights.safetensors"
    lone.parent.mkdir()
    lone.write_bytes((folder / "model.safetensors").read_bytes())
    loaded = lsmfm.load_pretrained(lone)
    assert loaded.lsmfm_config.voxel_size == [2.0, 1.0, 1.0]
    assert_same_state(loaded, net.state_dict())


def test_finetuned_folder_gives_its_backbone(tmp_path):
    net = build_backbone(TINY_UNET)
    head = torch.nn.Conv3d(8, 2, 1)
    state = {f"backbone.{k}": v for k, v in net.state_dict().items()}
    state |= {f"head.{k}": v for k, v in head.state_dict().items()}
    cfg = ModelConfig(backbone=TINY_UNET, patch_size=[32, 32, 32],
                      task={"name": "segment", "head": {"out_channels": 2}})
    folder = save_model_dir(tmp_path / "ft", state, cfg)
    loaded = lsmfm.load_pretrained(folder)
    assert_same_state(loaded, net.state_dict())
    assert loaded.lsmfm_config.task["name"] == "segment"


def test_which_must_match_the_exported_network(tiny_dir):
    folder, _ = tiny_dir
    with pytest.raises(InputError, match="holds the teacher network only"):
        lsmfm.load_pretrained(folder, which="student")


def test_hub_mixin_and_hf_hub_ids(tiny_dir, tmp_path, monkeypatch):
    folder, net = tiny_dir
    calls = []

    def fake_snapshot(**kwargs):
        calls.append(kwargs)
        return str(folder)

    import huggingface_hub
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot)
    assert_same_state(lsmfm.load_pretrained("hf-hub:lab/lsm-unet@v1"), net.state_dict())
    assert calls[0]["repo_id"] == "lab/lsm-unet" and calls[0]["revision"] == "v1"
    assert set(calls[0]["allow_patterns"]) == {"model.safetensors", "config.json", "README.md"}
    assert_same_state(UNetBackbone.from_pretrained("lab/lsm-unet"), net.state_dict())
    with pytest.raises(InputError, match="holds a UNetBackbone, not a SwinUNETRBackbone"):
        SwinUNETRBackbone.from_pretrained(folder)
    net.save_pretrained(tmp_path / "via_mixin")
    assert_same_state(UNetBackbone.from_pretrained(tmp_path / "via_mixin"), net.state_dict())


def test_unknown_source_names_the_releases():
    with pytest.raises(InputError, match="not a registered release .*unet_image_text"):
        lsmfm.load_pretrained("no/such/thing.ckpt")


def test_paper_releases_are_registered():
    for name, arch, width in [("unet_image_text", "unet", None), ("unet_image_only", "unet", None),
                              ("swinunetr_image_text", "swinunetr", 36),
                              ("swinunetr_image_only", "swinunetr", 24)]:
        r = RELEASES[name]
        assert r.url == f"https://zenodo.org/records/20146516/files/{name}_best.ckpt?download=1"
        assert r.format == "paper-ckpt" and r.arch["arch"] == arch
        assert (r.sha256 is None) == (arch == "unet")  # the SwinUNETRs' are known (registry docstring)
        assert r.arch.get("feature_size") == width
        assert r.arch["out_channels"] == (128 if arch == "unet" else 512)


def _release(tmp_path, sha256, arch=None) -> tuple[Release, dict]:
    src = tmp_path / "upload" / "tiny_best.ckpt"
    src.parent.mkdir(exist_ok=True)
    sd = write_paper_ckpt(src)
    digest = hashlib.sha256(src.read_bytes()).hexdigest() if sha256 == "right" else sha256
    release = Release(name="tiny_test", url=src.as_uri(), filename=src.name, format="paper-ckpt",
                      arch=arch or {"arch": "unet", "channels": [4, 8, 16], "out_channels": 8},
                      sha256=digest, size=src.stat().st_size)
    return release, sd


def test_release_download_verify_and_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setitem(RELEASES, "tiny_test", None)
    release, sd = _release(tmp_path, "right")
    register_release(release, replace=True)
    net = lsmfm.load_pretrained("tiny_test")
    assert_same_state(net, encoder(sd, "teacher"))
    assert net.lsmfm_config.pretraining["release"] == "tiny_test"
    cached = tmp_path / "cache" / "lsmfm" / "releases" / "tiny_test" / "tiny_best.ckpt"
    assert cached.is_file()
    monkeypatch.setattr(urllib.request, "urlopen", lambda *a, **k: pytest.fail("cache not used"))
    assert_same_state(lsmfm.load_pretrained("tiny_test", which="student"), encoder(sd, "student"))


def test_release_in_our_format_is_one_safetensors_file(tiny_dir, tmp_path, monkeypatch):
    folder, net = tiny_dir
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    weights = folder / "model.safetensors"
    monkeypatch.setitem(RELEASES, "tiny_st", Release(
        name="tiny_st", url=weights.as_uri(), filename="tiny.safetensors", format="safetensors",
        arch={"arch": "unet", "out_channels": 8}, sha256=hashlib.sha256(weights.read_bytes()).hexdigest()))
    loaded = lsmfm.load_pretrained("tiny_st")
    assert_same_state(loaded, net.state_dict())
    assert loaded.lsmfm_config.patch_size == [32, 32, 32]


def test_release_hash_mismatch_deletes_the_download(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setitem(RELEASES, "tiny_test", None)
    register_release(_release(tmp_path, "0" * 64)[0], replace=True)
    with pytest.raises(InputError, match="sha256 mismatch: expected 0000"):
        lsmfm.load_pretrained("tiny_test")
    folder = tmp_path / "cache" / "lsmfm" / "releases" / "tiny_test"
    assert list(folder.iterdir()) == []


def test_release_without_hash_loads_and_reports_it(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setitem(RELEASES, "tiny_test", None)
    release, _ = _release(tmp_path, None)
    register_release(release, replace=True)
    with caplog.at_level(logging.WARNING, logger="lsmfm.weights.download"):
        lsmfm.load_pretrained("tiny_test")
    assert "no published sha256 or md5" in caplog.text
    cached = tmp_path / "cache" / "lsmfm" / "releases" / "tiny_test" / "tiny_best.ckpt"
    recorded = cached.with_name(cached.name + ".sha256").read_text().strip()
    assert recorded == hashlib.sha256(cached.read_bytes()).hexdigest()
    cached.write_bytes(cached.read_bytes()[:-1] + b"x")  # swapped or damaged after the first download
    with pytest.raises(InputError, match="cached file fails its check \\(sha256 recorded at its first download "
                                         "mismatch"):
        lsmfm.load_pretrained("tiny_test")


def test_release_md5_is_checked_when_no_sha256_is_known(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setitem(RELEASES, "tiny_test", None)
    release, sd = _release(tmp_path, None)
    src = Path(release.url.removeprefix("file://"))
    good = dataclasses.replace(release, md5=hashlib.md5(src.read_bytes()).hexdigest())
    register_release(dataclasses.replace(good, md5="0" * 32), replace=True)
    with pytest.raises(InputError, match="md5 mismatch: expected 0{32}, got .*deleted"):
        lsmfm.load_pretrained("tiny_test")
    register_release(good, replace=True)
    assert_same_state(lsmfm.load_pretrained("tiny_test", which="student"), encoder(sd, "student"))
    cached = tmp_path / "cache" / "lsmfm" / "releases" / "tiny_test" / "tiny_best.ckpt"
    assert not cached.with_name(cached.name + ".sha256").exists()  # md5 known: nothing to trust on first use
    cached.write_bytes(b"\0" * cached.stat().st_size)
    with pytest.raises(InputError, match="cached file fails its check \\(md5 mismatch.*delete it to download"):
        lsmfm.load_pretrained("tiny_test")


def test_hub_sources_are_pinned_to_the_commit_they_resolved_to(tiny_dir, tmp_path, monkeypatch):
    import shutil

    import huggingface_hub

    folder, net = tiny_dir
    commit = "3f" * 20
    snap = tmp_path / "models--lab--lsm-unet" / "snapshots" / commit
    shutil.copytree(folder, snap)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda **kw: str(snap))
    loaded = lsmfm.load_pretrained("hf-hub:lab/lsm-unet@main")
    assert loaded.lsmfm_config.pretraining["source"] == f"hf-hub:lab/lsm-unet@{commit}"


def test_release_architecture_is_checked(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setitem(RELEASES, "tiny_test", None)
    register_release(_release(tmp_path, "right", {"arch": "unet", "out_channels": 128})[0], replace=True)
    with pytest.raises(InputError, match="does not match release 'tiny_test': out_channels is 8 in the file"):
        lsmfm.load_pretrained("tiny_test")


def test_loading_stays_light(tiny_dir):
    """load_pretrained never imports DeepSpeed or transformers."""
    code = ("import sys, lsmfm; net = lsmfm.load_pretrained(sys.argv[1]); "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'deepspeed', 'transformers'}))")
    out = subprocess.run([sys.executable, "-c", code, str(tiny_dir[0])], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "[]"


def test_readme_snippet_runs(tmp_path, monkeypatch):
    """The docs' Python snippet, run as written against a folder made where it expects one."""
    text = (REPO / "README.md").read_text()
    blocks = re.findall(r"<!-- test: run -->\n```python\n(.*?)```", text, flags=re.S)
    assert blocks, "no runnable snippet marked in README.md"
    monkeypatch.chdir(tmp_path)
    build_backbone(UNetConfig(channels=[4, 8, 16], strides=[2, 2], out_channels=8)).save_pretrained(
        "runs/exported", patch_size=[32, 32, 32])
    for code in blocks:
        scope: dict = {}
        exec(compile(code, "README.md", "exec"), scope)
        assert scope["features"].shape == (1, 8, 32, 32, 32) and scope["embedding"].shape == (1, 8)


def test_a_bare_name_means_the_same_for_load_pretrained_and_from_pretrained(tiny_dir, monkeypatch):
    """`org/name` is a Hub repository for both (after local paths and registered releases)."""
    folder, net = tiny_dir
    repos = []
    import huggingface_hub
    monkeypatch.setattr(huggingface_hub, "snapshot_download",
                        lambda **kw: repos.append(kw["repo_id"]) or str(folder))
    assert_same_state(lsmfm.load_pretrained("lab/lsm-unet"), net.state_dict())
    assert_same_state(UNetBackbone.from_pretrained("lab/lsm-unet"), net.state_dict())
    assert repos == ["lab/lsm-unet", "lab/lsm-unet"]
    def offline(**kwargs):
        raise OSError("offline")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    for load in (lsmfm.load_pretrained, UNetBackbone.from_pretrained):
        with pytest.raises(InputError, match="hf-hub:lab/typo: not a local file or folder nor a registered"):
            load("lab/typo")
