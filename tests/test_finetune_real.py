"""1-shot finetuning on the real sample patches (../shared/data/lsm_fm_samples/finetune, 96³ NIfTI):
32³ training crops, whole 96³ test patches scored by sliding window; the empty val mask stays finite."""
from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from finetune_helpers import TINY_BACKBONE

from lsmfm.cli.main import main

SPARSE_VAL = "amyloid_plaque_patch_003_vol016_ch0"


@pytest.fixture(scope="module")
def finetune_data(shared_data: Path) -> Path:
    root = shared_data / "lsm_fm_samples" / "finetune"
    if not root.is_dir():
        pytest.skip(f"{root} is absent")
    return root


def _dirs(root: Path) -> list[str]:
    return [f"data.{s}_dir={root / s}" for s in ("train", "val", "test")]


@pytest.mark.shared
def test_segment_one_shot_on_real_patches(finetune_data: Path, tmp_path: Path, capsys) -> None:
    run = tmp_path / "run"
    argv = ["finetune", "segment", "--out", str(run), *_dirs(finetune_data), "init=scratch", "shots=[1]",
            "seeds=[0]", "data.patch_size=[32,32,32]", "train.mode=full", "train.encoder_lr_scale=1.0",
            "train.max_steps=12", "train.val_every=12", "train.batch_size=2", "data.sw_size=[64,64,64]",
            "data.sw_overlap=0.25",
            *TINY_BACKBONE]
    assert main(argv) == 0
    print(capsys.readouterr().out)
    with open(run / "results.csv") as fh:
        (row,) = list(csv.DictReader(fh))
    for m in ("dice", "cldice", "iou", "val_dice"):
        assert 0.0 <= float(row[m]) <= 1.0, (m, row[m])
    with open(run / "per_image.csv") as fh:
        per_image = list(csv.DictReader(fh))
    structures = sorted(r["stem"].split("_patch_")[0] for r in per_image)
    assert structures == ["amyloid_plaque", "cell_nucleus", "vessels"]
    assert float(row["dice"]) == pytest.approx(np.mean([float(r["dice"]) for r in per_image]))
    import nibabel as nib

    preds = sorted((run / "scratch" / "shots1_seed0" / "predictions").glob("*_pred.nii.gz"))
    assert len(preds) == 3 and all(nib.load(str(p)).shape == (96, 96, 96) for p in preds)


@pytest.mark.shared
def test_empty_ground_truth_is_finite(finetune_data: Path) -> None:
    """The sparsest val mask (amyloid plaques, 42 foreground voxels of 96³) and an empty 32³ crop of it:
    loss and gradients finite; scores follow the empty convention (1 if nothing is predicted, else 0)."""
    from dataclasses import replace

    from lsmfm.data.normalize import NormalizeConfig
    from lsmfm.models.backbones.registry import build_backbone
    from lsmfm.models.backbones.unet import UNetConfig
    from lsmfm.tasks.config import DataConfig
    from lsmfm.tasks.models import build_task_model
    from lsmfm.tasks.segment import SegmentConfig, SegmentTask

    task = SegmentTask(SegmentConfig())
    val = task.load_split(DataConfig(val_dir=str(finetune_data / "val")), "val")
    (patch,) = [p for p in val if p.stem == SPARSE_VAL]
    crop = (slice(0, 32),) * 3
    empty = replace(patch, image=patch.image[(slice(None), *crop)], label=patch.label[crop])
    assert 0 < patch.label.sum() < 100 and empty.label.sum() == 0
    cfg = UNetConfig(channels=[8, 16, 32], strides=[2, 2], out_channels=8, num_res_units=1)
    torch.manual_seed(0)
    model = build_task_model("segment", build_backbone(cfg), task.head_config())
    examples = [task.prepare(p, NormalizeConfig()) for p in (patch, empty)]
    x, y = task.batch(examples, np.random.default_rng(0), (32, 32, 32), 4, flips=True)
    loss = task.loss(model(x), y)
    loss.backward()
    assert math.isfinite(loss.item())
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    scores = task.score(model.eval(), examples, (64, 64, 64), 0.25)
    assert all(math.isfinite(v) for v in scores.metrics.values())
    predicted_empty = not scores.predictions[1].any()
    assert scores.per_image[1]["dice"] == scores.per_image[1]["cldice"] == (1.0 if predicted_empty else 0.0)
