"""Files and folders written atomically keep the modes the umask allows (mkstemp/mkdtemp and safetensors
create 0600 files and 0700 folders, which colleagues on a shared cluster cannot read)."""
from __future__ import annotations

import os

import pytest


@pytest.mark.parametrize("mask,folder,file", [(0o022, 0o755, 0o644), (0o027, 0o750, 0o640)])
def test_model_folders_respect_the_umask(tmp_path, mask, folder, file):
    from lsmfm.models.backbones.unet import UNetConfig
    from lsmfm.weights.format import ModelConfig, save_model_dir

    net = UNetConfig(channels=[4, 8], strides=[2], out_channels=4).build()
    old = os.umask(mask)
    try:
        out = save_model_dir(tmp_path / "w", net.state_dict(), ModelConfig(backbone=net.config,
                                                                           patch_size=[16, 16, 16]))
    finally:
        os.umask(old)
    assert out.stat().st_mode & 0o777 == folder
    assert {p.name: p.stat().st_mode & 0o777 for p in out.iterdir()} == \
        {n: file for n in ("model.safetensors", "config.json", "README.md")}


def test_nested_atomic_folders_respect_the_umask(tmp_path):
    """A finetune run saves each kept model as run/<init>/<shots_seed>/model, each level atomically."""
    from lsmfm.io.atomic import atomic_dir

    old = os.umask(0o022)
    try:
        with atomic_dir(tmp_path / "run" / "kept") as tmp:
            with atomic_dir(tmp / "model") as inner:
                (inner / "w.bin").write_bytes(b"x")
    finally:
        os.umask(old)
    for p in (tmp_path / "run" / "kept", tmp_path / "run" / "kept" / "model"):
        assert p.stat().st_mode & 0o777 == 0o755
