"""2D data layouts, validation, tiling, and the instance and domain metrics against hand-computed values."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile
from PIL import Image

from lsmfm.baselines2d.config import Data2DConfig
from lsmfm.baselines2d.data import (
    find_pairs,
    load_case,
    load_splits,
    natural_sorted,
    tile_case,
)
from lsmfm.baselines2d.domains import dataset_samples, linear_probe_accuracy, pca_2d
from lsmfm.baselines2d.evaluate import score_case
from lsmfm.metrics.instances import accuracy_per_threshold, mean_segmentation_accuracy
from lsmfm.data.normalize import NormalizeConfig
from lsmfm.errors import InputError



def write_png(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def squares(n: int = 3, size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """An image and its instance label: n bright 6x6 squares on a dark background."""
    label = np.zeros((size, size), np.uint16)
    for i in range(n):
        label[4 + 9 * i : 10 + 9 * i, 4:10] = i + 1
    return (label > 0).astype(np.uint8) * 200 + 20, label


def test_image_label_folders_pair_by_name_in_natural_order(tmp_path):
    for i in (10, 2, 1):
        image, label = squares()
        write_png(tmp_path / "image" / f"{i}.png", image)
        write_png(tmp_path / "label" / f"{i}.png", (label > 0).astype(np.uint8) * 255)
    pairs = find_pairs(tmp_path, Data2DConfig())
    assert [p[0].name for p in pairs] == ["1.png", "2.png", "10.png"]
    assert all(i.name == lab.name and lab.parent.name == "label" for i, lab in pairs)
    assert [p.name for p in natural_sorted(tmp_path.glob("image/*"))] == ["1.png", "2.png", "10.png"]


def test_stem_label_layout_skips_blurred_and_globs_pair_in_order(tmp_path):
    image, label = squares()
    tifffile.imwrite(tmp_path / "a.tif", image)
    tifffile.imwrite(tmp_path / "a_label.tif", label)
    tifffile.imwrite(tmp_path / "a_blurred.tif", image)
    assert [(i.name, lab.name) for i, lab in find_pairs(tmp_path, Data2DConfig())] == [
        ("a.tif", "a_label.tif")
    ]
    cfg = Data2DConfig(image_glob="a.tif", label_glob="a_lab*.tif")
    assert [(i.name, lab.name) for i, lab in find_pairs(tmp_path, cfg)] == [("a.tif", "a_label.tif")]


def test_bad_inputs_name_the_file(tmp_path):
    image, label = squares()
    tifffile.imwrite(tmp_path / "a.tif", image)
    with pytest.raises(InputError, match="a_label.tif: label missing"):
        find_pairs(tmp_path, Data2DConfig())
    tifffile.imwrite(tmp_path / "a_label.tif", label[:-1])
    with pytest.raises(InputError, match=r"a_label.tif: label shape \(31, 32\) differs"):
        load_case(tmp_path / "a.tif", tmp_path / "a_label.tif", NormalizeConfig())
    tifffile.imwrite(tmp_path / "a_label.tif", label.astype(np.float32) / 2)
    with pytest.raises(InputError, match="integer ids"):
        load_case(tmp_path / "a.tif", tmp_path / "a_label.tif", NormalizeConfig())
    with pytest.raises(InputError, match="no image/label pairs"):
        (tmp_path / "empty").mkdir()
        find_pairs(tmp_path / "empty", Data2DConfig())


def test_nan_images_constant_images_and_empty_labels_are_refused_with_the_files(tmp_path):
    from lsmfm.baselines2d.config import Baseline2DConfig
    from lsmfm.baselines2d.train import run_baseline
    from lsmfm.config import load_config

    image, label = squares()
    nan = image.astype(np.float32)
    nan[3, 4] = nan[5, 6] = np.nan
    tifffile.imwrite(tmp_path / "a.tif", nan)
    tifffile.imwrite(tmp_path / "a_label.tif", label)
    with pytest.raises(InputError, match=r"a.tif: 2 NaN/Inf pixel\(s\) in the image"):
        load_case(tmp_path / "a.tif", tmp_path / "a_label.tif", NormalizeConfig())
    tiny = ["model.weights=", "model.size=tiny", "shots=[1]", "seeds=[0]", "train.max_steps=1",
            "train.device=cpu"]
    for name, (img, lab) in {"flat": (np.full((32, 32), 7, np.uint8), label),
                             "empty": (image, np.zeros_like(label))}.items():
        folder = tmp_path / name
        folder.mkdir()
        for i in range(3):
            tifffile.imwrite(folder / f"i{i}.tif", img if i < 2 else image)
            tifffile.imwrite(folder / f"i{i}_label.tif", lab if i < 2 else label)
        cfg = load_config(Baseline2DConfig, None,
                          [f"data.train_dir={folder}", "data.test_fraction=0.3", *tiny])
        match = "2 training image\\(s\\) are constant: i0, i1" if name == "flat" else \
            "every training label is empty \\(i0, i1\\)"
        with pytest.raises(InputError, match=match):
            run_baseline(cfg, tmp_path / f"run_{name}", progress=False)
        assert not (tmp_path / f"run_{name}").exists()
    cfg = load_config(Baseline2DConfig, None, [f"data.train_dir={tmp_path / 'empty'}",
                                               "data.test_fraction=0.3", "segment.allow_empty=true", *tiny])
    (row,) = run_baseline(cfg, tmp_path / "run_allowed", progress=False).rows
    assert row["val_dice"] is None and row["steps"] == 1  # no val_dir: no validation, the last weights


def test_volumes_are_cases_of_slices_and_split_keeps_the_last_fraction_for_test(tmp_path):
    vol = np.random.default_rng(0).random((5, 16, 16)).astype(np.float32)
    for name in ("v1", "v2", "v3", "v4"):
        tifffile.imwrite(tmp_path / f"{name}.tif", vol, imagej=True, metadata={"axes": "ZYX"})
        tifffile.imwrite(
            tmp_path / f"{name}_label.tif",
            (vol > 0.5).astype(np.uint8),
            imagej=True,
            metadata={"axes": "ZYX"},
        )
    splits = load_splits(Data2DConfig(train_dir=str(tmp_path), test_fraction=0.25))
    assert [c.name for c in splits.train] == ["v1", "v2", "v3"] and [c.name for c in splits.test] == ["v4"]
    assert splits.test[0].is_3d and splits.test[0].image.shape == (5, 16, 16)
    assert 0.0 <= splits.train[0].image.min() and splits.train[0].image.max() <= 1.0
    assert [len(c.foreground_slices) for c in splits.train] == [5, 5, 5]


def test_one_image_needs_tiles_to_be_split(tmp_path):
    image, label = squares(size=40)
    tifffile.imwrite(tmp_path / "img.tif", image)
    tifffile.imwrite(tmp_path / "mask.tif", label)
    cfg = {"train_dir": str(tmp_path), "image_glob": "img*.tif", "label_glob": "mask*.tif"}
    with pytest.raises(InputError, match="data.tile"):
        load_splits(Data2DConfig(**cfg))
    case = load_case(tmp_path / "img.tif", tmp_path / "mask.tif", NormalizeConfig())
    tiles = tile_case(case, 16)
    assert [t.name for t in tiles][:4] == ["img_y0_x0", "img_y0_x16", "img_y0_x24", "img_y16_x0"]
    assert len(tiles) == 9 and all(t.image.shape == (1, 16, 16) for t in tiles)
    np.testing.assert_array_equal(tiles[2].label[0], case.label[0, :16, 24:40])
    splits = load_splits(Data2DConfig(**cfg, tile=16, test_fraction=0.3))
    assert (len(splits.train), len(splits.test)) == (6, 3)


def test_instance_accuracy_hand_computed():
    gt = np.zeros((20, 20), int)
    gt[0:4, 0:4] = 1  # 16 px
    gt[10:14, 10:14] = 2
    pred = np.zeros_like(gt)
    pred[0:4, 0:3] = 5  # IoU 12/16 = 0.75 with object 1
    pred[10:14, 10:12] = 7  # IoU 8/16 = 0.5 with object 2
    pred[18:20, 18:20] = 9  # a false positive
    acc = accuracy_per_threshold(pred, gt)
    assert acc[0.5] == pytest.approx(2 / (2 + 1 + 0))
    assert acc[0.55] == acc[0.75] == pytest.approx(1 / (1 + 2 + 1))
    assert acc[0.8] == 0.0
    expected = (2 / 3 + 5 * 0.25) / 10
    assert mean_segmentation_accuracy(pred, gt) == pytest.approx(expected)


def test_binary_masks_are_split_into_components_and_empty_is_perfect():
    _image, label = squares()
    binary = (label > 0).astype(np.uint8) * 255
    assert mean_segmentation_accuracy(binary, label) == 1.0
    assert mean_segmentation_accuracy(np.zeros_like(label), np.zeros_like(label)) == 1.0
    assert mean_segmentation_accuracy(np.zeros_like(label), label) == 0.0


def test_3d_cases_are_scored_in_3d():
    from lsmfm.baselines2d.data import Case

    label = np.zeros((4, 8, 8), np.int32)
    label[1:3, 2:6, 2:6] = 1
    case = Case("v", np.zeros(label.shape, np.float32), label, True)
    pred = label > 0
    pred_half = pred.copy()
    pred_half[2] = False
    assert score_case(pred, case)["dice"] == 1.0
    assert score_case(pred_half, case)["dice"] == pytest.approx(2 * 16 / (16 + 32))
    assert score_case(pred_half, case)["seg_accuracy"] == pytest.approx(0.1)  # IoU 0.5: matched at 0.5 only


def test_linear_probe_separates_separable_data_and_not_identical_data():
    rng = np.random.default_rng(0)
    y = np.repeat([0, 1, 2], 12)
    far = rng.normal(size=(36, 5)) + 10 * y[:, None]
    assert linear_probe_accuracy(far, y) == 1.0
    same = rng.normal(size=(36, 5))
    assert linear_probe_accuracy(same, y) < 0.7
    with pytest.raises(InputError, match="at least 2 datasets"):
        linear_probe_accuracy(far[:12], y[:12])


def test_pca_finds_the_direction_of_largest_variance():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(50, 3)) * [10.0, 1.0, 0.1]
    coords, var = pca_2d(x)
    assert var[0] > 0.95 and coords.shape == (50, 2)
    assert abs(np.corrcoef(coords[:, 0], x[:, 0])[0, 1]) > 0.99


def test_domain_samples_tile_images_and_flatten_to_3d(tmp_path):
    image, label = squares(size=64)
    write_png(tmp_path / "ds" / "image" / "0.png", image)
    write_png(tmp_path / "ds" / "label" / "0.png", label.astype(np.uint8))
    tiles = dataset_samples(tmp_path / "ds", "2d", tile=32, max_samples=3, seed=0)
    assert len(tiles) == 3 and all(t.shape == (32, 32) for t in tiles)
    blocks = dataset_samples(tmp_path / "ds", "3d", tile=32, max_samples=10, seed=0)
    assert len(blocks) == 4 and all(b.shape == (32, 32, 32) for b in blocks)


def test_compare_summarises_runs_side_by_side(tmp_path, capsys):
    from lsmfm.baselines2d.evaluate import METRICS
    from lsmfm.cli.main import main
    from lsmfm.tasks.results import write_results

    for method, dice in (("lora", (0.5, 0.7)), ("ptsam", (0.2, 0.2))):
        rows = [{"shots": 1, "seed": s, "init": "scratch", "dice": d, "cldice": 0.1, "iou": 0.3,
                 "seg_accuracy": 0.0, "model": "sam", "method": method, "trainable_params": 2048,
                 "total_params": 10, "peak_memory_mb": 100.0, "sec_per_iter": 0.5, "steps": 3}
                for s, d in enumerate(dice)]
        (tmp_path / method).mkdir()
        write_results(tmp_path / method, rows, METRICS)
    assert main(["baseline2d", "--compare", str(tmp_path / "lora"), str(tmp_path / "ptsam"),
                 "--out", str(tmp_path / "table.csv")]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[2].startswith("| lora | sam | lora | scratch | 2,048 | 1 | 2 | 0.600 ± 0.100 |")
    assert out[3].startswith("| ptsam | sam | ptsam | scratch | 2,048 | 1 | 2 | 0.200 ± 0.000 |")
    csv_rows = (tmp_path / "table.csv").read_text().splitlines()
    assert csv_rows[1].startswith("lora,sam,lora,scratch,2048,1,2,0.6")
