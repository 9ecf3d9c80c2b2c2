"""BatchNorm re-estimation: running statistics become the statistics of the given windows (nothing else
changes), and `lsmfm finetune ... bn_stats=reestimate which=teacher scale=pretraining` finetunes the
paper's UNet teacher (whose statistics were never trained) from statistics of the user's training
images, at its pretraining voxel scale, all recorded in the kept model's config. A backbone's
`input_scale` resizes at its boundary (tested against resizing by hand)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from finetune_helpers import write_dataset
from paper_fixtures import write_paper_pretraining_ckpt

from lsmfm.cli.main import main
from lsmfm.models.backbones.unet import UNetConfig
from lsmfm.models.batchnorm import batchnorm_layers, image_windows, reestimate_batchnorm
from lsmfm.tasks.models import load_task_model


def test_statistics_are_those_of_the_windows_and_nothing_else_changes():
    net = UNetConfig(channels=[4, 8], strides=[2], num_res_units=1, out_channels=4).build()
    windows = torch.rand(6, 1, 8, 8, 8, generator=torch.Generator().manual_seed(0)) * 5 + 2
    seen = []
    first = batchnorm_layers(net)[0]
    first.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach().clone()))
    params = {k: v.clone() for k, v in net.named_parameters()}
    assert reestimate_batchnorm(net, windows, batch_size=len(windows)) == 6
    x = seen[0].transpose(0, 1).reshape(first.num_features, -1)
    assert torch.allclose(first.running_mean, x.mean(dim=1), atol=1e-5)
    assert torch.allclose(first.running_var, x.var(dim=1, unbiased=True), rtol=1e-4)
    assert int(first.num_batches_tracked) == 1 and first.momentum == 0.1 and not net.training
    assert all(torch.equal(v, params[k]) for k, v in net.named_parameters())
    instance = UNetConfig(channels=[4, 8], strides=[2], num_res_units=1, norm="instance").build()
    assert reestimate_batchnorm(instance, windows) == 0


def test_image_windows_grid_padding_and_limit():
    images = [np.zeros((1, 20, 16, 8), np.float32), np.ones((1, 4, 8, 8), np.float32)]
    windows = image_windows(images, (8, 8, 8))
    assert windows.shape == (2 * 2 * 1 + 1, 1, 8, 8, 8)
    assert image_windows(images, (8, 8, 8), limit=3).shape[0] == 3


@pytest.mark.slow
def test_finetune_reestimates_the_paper_teachers_statistics(tmp_path, capsys):
    ckpt = write_paper_pretraining_ckpt(tmp_path / "paper", "unet", use_text=False)
    dataset = write_dataset(tmp_path / "data", n_train=1, n_eval=1, size=16)
    run = tmp_path / "run"
    argv = [
        "finetune",
        "segment",
        "--out",
        str(run),
        "--quiet",
        *(f"data.{k}_dir={v}" for k, v in dataset.items()),
        f"pretrained={ckpt}",
        "which=teacher",
        "bn_stats=reestimate",
        "scale=pretraining",
        "init=pretrained",
        "shots=[1]",
        "seeds=[0]",
        "train.max_steps=2",
        "train.val_every=2",
        "train.batch_size=1",
    ]
    assert main(argv) == 0
    _, config = load_task_model(next(run.glob("*/*/model")))
    assert config.pretraining["which"] == "teacher" and config.backbone.axes == "xyz"
    # scale=pretraining: patches of the pretraining read size (12³), resized to 8³ for the network
    assert config.backbone.input_scale == pytest.approx(8 / 12) and config.patch_size == [12, 12, 12]
    assert "windows of (12, 12, 12) voxels from 3 training image(s)" in (
        config.pretraining["batchnorm"]["reestimated_on"])


def test_input_scale_resizes_at_the_boundary_and_sets_the_input_multiple():
    import dataclasses

    import torch.nn.functional as F

    cfg = UNetConfig(channels=[4, 8, 16, 16], strides=[2, 2, 2], num_res_units=1, out_channels=4)
    scaled = dataclasses.replace(cfg, input_scale=64 / 96, axes="xyz")
    assert (cfg.input_multiple, scaled.input_multiple) == (8, 12)
    net = cfg.build().eval()
    net_scaled = scaled.build().eval()
    net_scaled.load_state_dict(net.state_dict())
    x = torch.rand(1, 1, 24, 36, 48, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        small = F.interpolate(x, size=(16, 24, 32), mode="trilinear", align_corners=False)
        raw = net(small.permute(0, 1, 4, 3, 2)).permute(0, 1, 4, 3, 2)
        want = F.interpolate(raw, size=(24, 36, 48), mode="trilinear", align_corners=False)
        assert torch.equal(net_scaled(x), want)
    with pytest.raises(ValueError, match="divisible by 12"):
        net_scaled(torch.rand(1, 1, 16, 16, 16))
