"""The in-domain pretraining evidence: recipe, catalogs and split hold labels and test images out."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from lsmfm.compare.config import compare_config_class
from lsmfm.config import load_config
from lsmfm.data.catalog.entries import load_catalog
from lsmfm.io.volumes import read_volume
from lsmfm.tasks.segment import SegmentFinetuneConfig
from lsmfm.training.pretrain import PretrainConfig

REPO = Path(__file__).resolve().parents[1]
CONFOCAL = "data_catalog/confocal_nuclei_unlabelled.yaml"


def test_recipe_is_image_only_reconstruction_at_cpu_scale():
    cfg = load_config(PretrainConfig, REPO / "pretrain" / "in_domain_small.yaml")
    assert not cfg.model.use_text and cfg.train.device == "cpu" and cfg.data.patch_size == [32, 32, 32]
    assert cfg.model.recon.weight > 0
    assert all((REPO / c).is_file() for c in cfg.data.catalogs)


@pytest.mark.parametrize("name", ["in_domain_segment", "in_domain_confocal"])
def test_finetune_configs_give_scratch_the_same_optimiser(name):
    cfg = load_config(SegmentFinetuneConfig, REPO / "finetune" / f"{name}.yaml")
    assert cfg.init == "both" and cfg.train.mode == "full" and cfg.train.encoder_lr_scale == 1.0
    assert cfg.shots == [1, 2, 3] and cfg.seeds == [0, 1, 2]
    assert cfg.segment.binarize == (name == "in_domain_confocal")


def test_comparison_config_runs_the_in_domain_protocol_for_every_arm():
    """finetune/compare_in_domain.yaml: its 3D arms are the runs of in_domain_segment.yaml (same data, steps,
    loss), plus a 2D arm under the same budget."""
    cmp = load_config(compare_config_class("segment"), REPO / "finetune" / "compare_in_domain.yaml")
    ft = load_config(SegmentFinetuneConfig, REPO / "finetune" / "in_domain_segment.yaml")
    assert (cmp.data, cmp.train, cmp.segment, cmp.shots, cmp.seeds) == (ft.data, ft.train, ft.segment,
                                                                          ft.shots, ft.seeds)
    assert [a.kind for a in cmp.arms] == ["pretrained", "scratch", "baseline2d"]
    assert cmp.arms[0].source == ft.pretrained and not any(a.train for a in cmp.arms)


@pytest.mark.shared
@pytest.mark.parametrize("catalog, test_dir", [
    ("data_catalog/lsm_fm_finetune_unlabelled.yaml", "lsm_fm_samples/finetune/test"),
    (CONFOCAL, "confocal_nuclei_instances")])
def test_pretraining_catalogs_withhold_labels_and_test_images(shared_data, catalog, test_dir):
    entries = load_catalog(REPO / catalog)
    sources = [p for e in entries for p in e.source_paths]
    split = REPO / "runs" / "data" / "confocal_nuclei_split"   # written by benchmarks/confocal_split.py
    assert sources and all(p.is_file() or p.is_relative_to(split) for p in sources)
    assert not any(e.label_sources or e.labels for e in entries)
    assert not any("_label" in p.name or "_blurred" in p.name for p in sources)
    if "finetune" in test_dir:
        test_images = {p.resolve() for p in (shared_data / test_dir).glob("*_ch[0-9].nii.gz")}
        assert len(test_images) == 3
        assert not test_images & {p.resolve() for p in sources}
    else:
        assert {p.name for p in sources} == {"1135_mini.tif", "1136_mini_ztop.tif"}   # not the test half


@pytest.mark.shared
def test_confocal_split_octants_of_the_train_volume(shared_data, tmp_path):
    subprocess.run([sys.executable, str(REPO / "benchmarks" / "confocal_split.py"), "--out", str(tmp_path)],
                   check=True, capture_output=True)
    train = sorted((tmp_path / "train").glob("*_octant?.tif"))
    assert len(train) == 8
    whole, spacing = read_volume(shared_data / "confocal_nuclei_instances" / "1135_mini_label.tif")
    octant, octant_spacing = read_volume(tmp_path / "train" / "1135_mini_octant7_label.tif")
    assert octant.shape[-3:] == (50, 50, 50) and np.allclose(octant_spacing, spacing)
    assert np.array_equal(np.squeeze(octant), np.squeeze(whole)[50:, 50:, 50:])
    held_out, _ = read_volume(shared_data / "confocal_nuclei_instances" / "1136_mini.tif")
    val, _ = read_volume(tmp_path / "val" / "1136_mini_ztop.tif")
    test, _ = read_volume(tmp_path / "test" / "1136_mini_zbottom.tif")
    assert np.array_equal(np.concatenate([np.squeeze(val), np.squeeze(test)]), np.squeeze(held_out))
    assert not any("1137" in p.name for p in tmp_path.rglob("*.tif"))   # its image is noise
