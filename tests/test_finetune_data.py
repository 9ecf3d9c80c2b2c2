"""Finetuning inputs: folder layout, label checks, classes, few-shot subsets, config, and bad inputs
through the real CLI (each a clear error naming the file, and no run folder left behind)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from finetune_helpers import TINY_BACKBONE, data_overrides, write_dataset, write_nifti

from lsmfm.cli.main import main
from lsmfm.config import load_config
from lsmfm.errors import ConfigError, InputError
from lsmfm.tasks.classify import ClassifyConfig
from lsmfm.tasks.config import DataConfig
from lsmfm.tasks.segment import SegmentFinetuneConfig
from lsmfm.tasks.data import load_folder, scan_folder, split_name

SCRATCH = ["init=scratch", "data.patch_size=[32,32,32]", "train.max_steps=1", *TINY_BACKBONE]


def test_scan_groups_companions_and_reads_zyx(tmp_path: Path) -> None:
    image = np.arange(4 * 5 * 6, dtype=np.float32).reshape(4, 5, 6)
    write_nifti(tmp_path / "a_patch_0.nii.gz", image)
    write_nifti(tmp_path / "a_patch_0_label.nii.gz", (image > 60).astype(np.uint8))
    write_nifti(tmp_path / "a_patch_0_blurred.nii.gz", image * 0.5)
    (tmp_path / "notes.txt").write_text("ignored")
    groups = scan_folder(tmp_path)
    assert list(groups) == ["a_patch_0"] and sorted(groups["a_patch_0"]) == ["blurred", "image", "label"]
    (patch,) = load_folder(tmp_path, label=True, blurred=True, class_pattern=ClassifyConfig().class_pattern)
    assert patch.image.shape == (1, 4, 5, 6) and np.array_equal(patch.image[0], image)
    assert patch.label.sum() == (image > 60).sum() and patch.class_name == "a"
    assert np.allclose(patch.blurred[0], image * 0.5)
    assert split_name(Path("x_label.ome.zarr")) == ("x_label", ".ome.zarr")


def test_label_checks(tmp_path: Path) -> None:
    write_nifti(tmp_path / "p.nii.gz", np.zeros((8, 8, 8), np.float32))
    write_nifti(tmp_path / "p_label.nii.gz", np.full((8, 8, 8), 3, np.uint8))
    with pytest.raises(InputError, match=r"p_label\.nii\.gz: labels must be binary \(0/1\), found values 3"):
        load_folder(tmp_path, label=True)
    (patch,) = load_folder(tmp_path, label=True, binarize=True)
    assert patch.label.min() == 1
    write_nifti(tmp_path / "p_label.nii.gz", np.zeros((8, 8, 9), np.uint8))
    with pytest.raises(InputError, match=r"label shape \(8, 8, 9\) differs from the image shape \(8, 8, 8\)"):
        load_folder(tmp_path, label=True)
    (tmp_path / "p_label.nii.gz").unlink()
    with pytest.raises(InputError, match=r"p_label\.nii\.gz: missing label file for image p\.nii\.gz"):
        load_folder(tmp_path, label=True)
    write_nifti(tmp_path / "q_label.nii.gz", np.zeros((8, 8, 8), np.uint8))
    with pytest.raises(InputError, match=r"q_label\.nii\.gz: no image q<ext>"):
        scan_folder(tmp_path)


def test_unreadable_image_and_bad_class_name(tmp_path: Path) -> None:
    (tmp_path / "vessels_patch_0.nii.gz").write_bytes(b"not a nifti file")
    with pytest.raises(InputError, match=r"vessels_patch_0\.nii\.gz: cannot read nifti"):
        load_folder(tmp_path)
    write_nifti(tmp_path / "vessels_patch_0.nii.gz", np.zeros((8, 8, 8), np.float32))
    write_nifti(tmp_path / "oddname.nii.gz", np.zeros((8, 8, 8), np.float32))
    with pytest.raises(InputError, match=r"oddname\.nii\.gz: file name does not match classify"):
        load_folder(tmp_path, class_pattern=ClassifyConfig().class_pattern)


def test_config_keys_are_checked() -> None:
    cfg = load_config(SegmentFinetuneConfig, None, ["init=scratch", "shots=[1,3]", "train.mode=linear"])
    assert cfg.shots == [1, 3] and cfg.inits == ["scratch"] and cfg.train.mode == "linear"
    assert load_config(SegmentFinetuneConfig, None, ["pretrained=x"]).inits == ["pretrained", "scratch"]
    with pytest.raises(ConfigError, match="unknown key.*classify"):
        load_config(SegmentFinetuneConfig, None, ["init=scratch", "classify.head=mlp"])
    with pytest.raises(ConfigError, match="needs `pretrained`"):
        load_config(SegmentFinetuneConfig, None, [])
    with pytest.raises(ConfigError, match="train.mode must be one of"):
        load_config(SegmentFinetuneConfig, None, ["init=scratch", "train.mode=probe"])


def test_classify_shots_are_per_class_and_nested(tmp_path: Path) -> None:
    from lsmfm.tasks.classify import ClassifyTask

    dirs = write_dataset(tmp_path / "data", n_train=3, n_eval=1, size=16)
    task = ClassifyTask(ClassifyConfig())
    train = task.load_split(DataConfig(train_dir=str(dirs["train"])), "train")
    task.setup(train, [])
    assert task.classes == ["amyloid_plaque", "cell_nucleus", "vessels"]
    one, two = task.subset(train, 1, 7, "train"), task.subset(train, 2, 7, "train")
    assert sorted(train[i].class_name for i in one) == task.classes
    assert set(one) <= set(two) and len(two) == 6
    with pytest.raises(InputError, match=r"train \(class amyloid_plaque\): 4 shots requested but only 3"):
        task.subset(train, 4, 0, "train")


def test_class_weights_are_inverse_frequencies() -> None:
    import torch

    from lsmfm.tasks.base import Example
    from lsmfm.tasks.classify import ClassifyTask

    task = ClassifyTask(ClassifyConfig(per_class=False))
    task.classes = ["a", "b", "c"]
    task.begin_run([Example(None, np.zeros(1), t) for t in (0, 0, 0, 1)])  # type: ignore[arg-type]
    # n / (k * count): 4 / (3 * 3) and 4 / (3 * 1); a class absent from the run gets weight 0
    assert torch.allclose(task.class_weights, torch.tensor([4 / 9, 4 / 3, 0.0]))
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    target = torch.tensor([0, 1])
    nll = -torch.log_softmax(logits, 1)[[0, 1], [0, 1]]
    expected = (4 / 9 * nll[0] + 4 / 3 * nll[1]) / (4 / 9 + 4 / 3)
    assert torch.isclose(task.loss(logits, target), expected)


def _fails(argv: list[str], out: Path, capsys: pytest.CaptureFixture, message: str) -> None:
    assert main(argv + ["--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert message in err, err
    assert not out.exists()


def test_bad_inputs_stop_before_any_output(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    dirs = write_dataset(tmp_path / "data", n_train=1, n_eval=1, size=32)
    base = ["finetune", "segment", *data_overrides(dirs), *SCRATCH]
    out = tmp_path / "run"
    _fails(base + ["shots=[1,4]"], out, capsys, "4 shots requested but only 3 training patches available")
    label = dirs["train"] / "vessels_patch_000_vol000_ch0_label.nii.gz"
    write_nifti(label, np.full((32, 32, 32), 2, np.uint8))
    _fails(base, out, capsys, f"{label}: labels must be binary (0/1), found values 2")
    write_nifti(label, np.zeros((32, 32, 16), np.uint8))
    _fails(base, out, capsys, f"{label}: label shape (32, 32, 16) differs from the image shape (32, 32, 32)")
    label.unlink()
    _fails(base, out, capsys, f"{label}: missing label file for image vessels_patch_000_vol000_ch0.nii.gz")
    write_nifti(label, np.zeros((32, 32, 32), np.uint8))
    _fails(base + ["data.patch_size=[64,64,64]"], out, capsys,
           "is smaller than the patch size [64, 64, 64] (data.patch_size)")
    _fails(base + ["data.patch_size=[30,32,32]"], out, capsys,
           "must be divisible by 4 for unet; set data.patch_size")
    # instance norm (the paper's SwinUNETRs) cannot normalise the one voxel a 32³ patch leaves at 1/32
    _fails(base + ["backbone={arch: swinunetr, feature_size: 12, norm: instance}"], out, capsys,
           "patch size [32, 32, 32] (data.patch_size) gives the network [32, 32, 32] voxels, one at its 1/32 "
           "bottleneck")


def test_pretrained_patch_size_must_fit_the_data(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from lsmfm.models.backbones.registry import build_backbone
    from lsmfm.models.backbones.unet import UNetConfig

    dirs = write_dataset(tmp_path / "data", n_train=1, n_eval=1, size=32)
    net = build_backbone(UNetConfig(channels=[8, 16, 32], strides=[2, 2], out_channels=8,
                                    num_res_units=1))
    weights = net.save_pretrained(tmp_path / "weights", patch_size=[64, 64, 64])
    _fails(["finetune", "segment", *data_overrides(dirs), f"pretrained={weights}", "train.max_steps=1"],
           tmp_path / "run", capsys,
           "is smaller than the patch size [64, 64, 64] (patch size of the pretrained model")


def test_existing_run_folder_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "run"
    out.mkdir()
    (out / "results.csv").write_text("old")
    assert main(["finetune", "segment", "--out", str(out), "init=scratch"]) == 1
    assert "already exists and is not empty" in capsys.readouterr().err
    assert (out / "results.csv").read_text() == "old"


@pytest.mark.parametrize("command", [["finetune", "segment"], ["compare", "segment"]])
def test_empty_labels_and_constant_images_are_refused_naming_the_files(tmp_path: Path, command: list[str],
                                                                       capsys: pytest.CaptureFixture) -> None:
    """Training on labels that are all empty, or on a constant image, would run to the end and mean
    nothing: refused before any output, every such file named (empty labels: unless segment.allow_empty)."""
    dirs = write_dataset(tmp_path / "data", n_train=1, n_eval=1, size=32)
    setting = SCRATCH[1:] + ["arms=[{name: s, kind: scratch}]"] if command[0] == "compare" else SCRATCH
    base = [*command, *data_overrides(dirs), *setting, "shots=[1]", "seeds=[0,1,2,3,4,5]"]
    out = tmp_path / "run"
    labels = sorted(dirs["train"].glob("*_label.nii.gz"))
    for label in labels:
        write_nifti(label, np.zeros((32, 32, 32), np.uint8))
    assert main([*base, "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "every training label is empty (" in err and not out.exists()
    assert "nothing to segment; add annotated volumes, or set segment.allow_empty=true" in err
    assert all(label.name.replace("_label", "") in err for label in labels), err
    kept = labels[0]
    write_nifti(kept, (np.arange(32 ** 3).reshape((32,) * 3) % 7 == 0).astype(np.uint8))
    _fails(base, out, capsys, "draws only volumes with empty labels (")
    assert main([*base, "seeds=[0]", "segment.allow_empty=true", "--out", str(out), "--quiet"]) == 0
    image = dirs["train"] / kept.name.replace("_label", "")
    write_nifti(image, np.full((32, 32, 32), 7.0, np.float32))
    _fails([*base, "segment.allow_empty=true"], tmp_path / "run2", capsys,
           f"1 training image(s) are constant (every voxel 7 or the like): {image}")
