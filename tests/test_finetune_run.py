"""Few-shot finetuning end to end on tiny synthetic patches: the training modes, each task through the
real CLI or the protocol runner, and the outputs the contract promises."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from finetune_helpers import TINY_BACKBONE, data_overrides, write_dataset

from lsmfm.cli.main import main
from lsmfm.config import load_config
from lsmfm.models.backbones.registry import build_backbone
from lsmfm.models.backbones.unet import UNetConfig
from lsmfm.tasks.config import DataConfig, TrainConfig
from lsmfm.tasks.models import build_task_model, load_task_model
from lsmfm.tasks.registry import finetune_config_class
from lsmfm.tasks.segment import SegmentConfig

FAST = ["train.max_steps=4", "train.val_every=2", "train.batch_size=1", "data.patch_size=[32,32,32]",
        "train.head_steps=2", "seeds=[0]", *TINY_BACKBONE]


def _rows(run: Path) -> list[dict[str, str]]:
    with open(run / "results.csv") as fh:
        return list(csv.DictReader(fh))


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return write_dataset(tmp_path_factory.mktemp("patches") / "finetune", n_train=2, n_eval=1, size=32)


def _segment_setup(dataset: dict[str, Path]):
    from lsmfm.data.normalize import NormalizeConfig
    from lsmfm.tasks.segment import SegmentTask

    task = SegmentTask(SegmentConfig())
    data = DataConfig(**{f"{k}_dir": str(v) for k, v in dataset.items()})
    train = [task.prepare(p, NormalizeConfig()) for p in task.load_split(data, "train")]
    val = [task.prepare(p, NormalizeConfig()) for p in task.load_split(data, "val")]
    cfg = UNetConfig(channels=[8, 16, 32], strides=[2, 2], out_channels=8, num_res_units=1)
    return task, train, val, cfg


def _train(dataset, mode: str, seed: int = 0):
    from lsmfm.tasks.base import Geometry
    from lsmfm.tasks.train import train_run

    task, train, val, cfg = _segment_setup(dataset)
    torch.manual_seed(seed)
    model = build_task_model("segment", build_backbone(cfg), task.head_config())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    tcfg = TrainConfig(mode=mode, max_steps=3, head_steps=2, val_every=10, batch_size=1, patience=0)
    result = train_run(model, task, train, val, tcfg, Geometry((32, 32, 32), (32, 32, 32), 0.5), seed)
    return before, model.state_dict(), result


def _changed(before, after, prefix: str) -> bool:
    return any(not torch.equal(before[k], after[k]) for k in before if k.startswith(prefix))


def test_training_modes_and_same_curve_from_same_seed(dataset: dict[str, Path]) -> None:
    from lsmfm.tasks.train import encoder_frozen

    staged = TrainConfig(mode="staged", head_steps=2)
    assert [encoder_frozen(staged, s) for s in range(4)] == [True, True, False, False]
    assert all(encoder_frozen(TrainConfig(mode="linear"), s) for s in range(3))
    assert not encoder_frozen(TrainConfig(mode="full"), 0)
    before, after, result = _train(dataset, "linear")
    assert result.steps == 3 and result.best_step == 3 and np.isfinite(result.val_score)
    assert _changed(before, after, "head.") and not _changed(before, after, "backbone.")  # BN stats too
    before, after, _ = _train(dataset, "staged")
    assert _changed(before, after, "head.") and _changed(before, after, "backbone.")
    _, again, _ = _train(dataset, "staged")
    assert all(torch.equal(after[k], again[k]) for k in after)


def test_classify_through_cli(dataset: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture
                              ) -> None:
    run = tmp_path / "run"
    argv = ["finetune", "classify", "--out", str(run), *data_overrides(dataset), "init=scratch",
            "shots=[1,2]", "classify.head=mlp", *FAST]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "balanced_accuracy" in out and "scratch  2" in out
    rows = _rows(run)
    assert [(r["shots"], r["seed"], r["init"]) for r in rows] == [("1", "0", "scratch"),
                                                                 ("2", "0", "scratch")]
    assert all(0.0 <= float(r[m]) <= 1.0 for r in rows for m in ("accuracy", "balanced_accuracy", "macro_f1"))
    assert len(rows[1]["train_patches"].split()) == 6  # 2 shots per class
    resolved = load_config(finetune_config_class("classify"), run / "config.yaml")
    assert resolved.shots == [1, 2] and resolved.classify.head == "mlp" and resolved.init == "scratch"
    kept = run / "scratch" / "shots2_seed0"
    assert (kept / "predictions" / "confusion_matrix.png").stat().st_size > 0
    with open(kept / "predictions" / "predictions.csv") as fh:
        preds = list(csv.DictReader(fh))
    assert {p["true"] for p in preds} == {"amyloid_plaque", "cell_nucleus", "vessels"}
    assert np.mean([p["true"] == p["predicted"] for p in preds]) == float(rows[1]["accuracy"])
    _, config = load_task_model(kept / "model")
    assert config.task["classes"] == ["amyloid_plaque", "cell_nucleus", "vessels"]
    assert config.task["head"]["kind"] == "mlp"


def test_deblur_from_synthetic_pairs(dataset: dict[str, Path], tmp_path: Path) -> None:
    from lsmfm.tasks.fewshot import plan_fewshot, run_fewshot
    from lsmfm.metrics.restoration import psnr

    cfg = load_config(finetune_config_class("deblur"), None,
                      [*data_overrides(dataset), "init=scratch", "shots=[1]", "deblur.pairs=synthetic", *FAST])
    plan = plan_fewshot("deblur", cfg)
    (row,) = run_fewshot(plan, tmp_path / "run").rows
    assert set(plan.task.metrics) <= set(row) and np.isfinite(row["psnr"]) and 0 < row["ssim"] <= 1
    inputs = [plan.task.prepare(p, plan.normalize) for p in plan.splits["test"]]
    expected = np.mean([psnr(ex.input, ex.target, data_range=1.0) for ex in inputs])
    assert row["psnr_input"] == pytest.approx(expected)
    # the zero-initialised residual head starts as the identity, so 4 steps stay close to the input
    assert abs(row["psnr"] - row["psnr_input"]) < 3.0
    written = sorted((tmp_path / "run" / "scratch" / "shots1_seed0" / "predictions").iterdir())
    assert [p.name for p in written] == [f"{p.stem}_deblurred.nii.gz" for p in plan.splits["test"]]


def test_deblur_reads_blurred_files(dataset: dict[str, Path]) -> None:
    from lsmfm.tasks.deblur import DeblurConfig, DeblurTask, degrade

    task = DeblurTask(DeblurConfig(pairs="files"))
    patch = task.load_split(DataConfig(test_dir=str(dataset["test"])), "test")[0]
    assert patch.blurred is not None and patch.blurred.std() < patch.image.std()
    degraded = degrade(patch.image, DeblurConfig(psf_sigma=[0.0, 0.0, 0.0], photons=1e9, read_noise=0.0), 0)
    positive = patch.image > 0  # negative intensities emit no photons
    assert np.allclose(degraded[positive], patch.image[positive], rtol=1e-3, atol=0.1)
    noisy = degrade(patch.image, DeblurConfig(psf_sigma=[0.0, 0.0, 0.0], photons=10.0, read_noise=0.0), 0)
    level = np.percentile(patch.image, 99.5)
    # Poisson: variance of counts = mean counts, i.e. var(noisy) ~ image * level / photons
    ratio = np.var(noisy - patch.image) / np.mean(patch.image * level / 10.0)
    assert 0.9 < ratio < 1.1


def test_segment_pretrained_vs_scratch_through_cli(dataset: dict[str, Path], tmp_path: Path,
                                                   capsys: pytest.CaptureFixture) -> None:

    net = build_backbone(UNetConfig(channels=[8, 16, 32], strides=[2, 2], out_channels=8,
                                    num_res_units=1))
    weights = net.save_pretrained(tmp_path / "weights", patch_size=[32, 32, 32])
    run = tmp_path / "run"
    argv = ["finetune", "segment", "--out", str(run), *data_overrides(dataset), f"pretrained={weights}",
            "shots=[1,2]", "seeds=[0,1]", "train.max_steps=4", "train.val_every=2", "train.batch_size=1",
            "keep=best"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "pretrained  1" in out and "scratch     2" in out
    rows = _rows(run)
    assert len(rows) == 8 and list(rows[0])[:6] == ["shots", "seed", "init", "dice", "cldice", "iou"]
    assert {(r["shots"], r["seed"], r["init"]) for r in rows} == {
        (k, s, i) for k in "12" for s in "01" for i in ("pretrained", "scratch")}
    for r in rows:
        assert all(0.0 <= float(r[m]) <= 1.0 for m in ("dice", "cldice", "iou"))
    summary = json.loads((run / "metrics.json").read_text())["summary"]
    assert {(e["init"], e["shots"], e["n_seeds"]) for e in summary} == {
        ("pretrained", 1, 2), ("pretrained", 2, 2), ("scratch", 1, 2), ("scratch", 2, 2)}
    for m in ("dice", "cldice", "iou"):
        assert (run / f"{m}_vs_shots.png").stat().st_size > 0
    assert len(list((run / "tb").iterdir())) == 8 and list((run / "tb").rglob("events.out.tfevents.*"))
    kept = sorted(p.relative_to(run).parent.as_posix() for p in run.glob("*/*/model"))
    assert len(kept) == 4 and {k.split("/")[0] for k in kept} == {"pretrained", "scratch"}
    _check_kept_model(run / kept[0], dataset)


def _check_kept_model(kept: Path, dataset: dict[str, Path]) -> None:
    """The saved model, reloaded, reproduces the saved test predictions; the backbone half has the
    backbone's own keys."""
    import nibabel as nib

    from lsmfm.data.normalize import percentile_normalize
    from lsmfm.tasks.base import sliding_window
    from lsmfm.tasks.data import load_folder

    model, config = load_task_model(kept / "model")
    assert config.task["name"] == "segment" and config.patch_size == [32, 32, 32]
    assert any(k.startswith("backbone.model.") for k in model.state_dict())
    patch = load_folder(dataset["test"], label=True)[0]
    image = percentile_normalize(patch.image, config.normalize)
    mask = (torch.sigmoid(sliding_window(model, image, (32, 32, 32), 0.5))[0] > 0.5).numpy()
    saved = nib.load(str(kept / "predictions" / f"{patch.stem}_pred.nii.gz"))
    saved = np.asarray(saved.dataobj).transpose(2, 1, 0)
    assert saved.shape == mask.shape and np.array_equal(saved.astype(bool), mask)


def test_segment_from_catalog_entries(tmp_path: Path) -> None:
    """Catalog entries with NGFF label images: whole ingested volumes, classes from `class_label`."""
    from finetune_helpers import scene

    from lsmfm.data.catalog.entries import write_catalog
    from lsmfm.data.catalog.materialize import ingest_catalog
    from lsmfm.data.synthetic.write import write_tiff
    from lsmfm.tasks.data import load_split

    rng = np.random.default_rng(0)
    entries = []
    for i, cls in enumerate(["cell_nucleus", "vessels", "cell_nucleus"]):
        image, mask = scene(cls, 40, rng)
        write_tiff(tmp_path / f"v{i}.tif", image, (2.0, 1.0, 1.0))
        write_tiff(tmp_path / f"v{i}_mask.tif", mask, (2.0, 1.0, 1.0))
        entries.append({"id": f"v{i}", "store": f"stores/v{i}.zarr", "source": [f"v{i}.tif"],
                        "label_sources": {"fg": f"v{i}_mask.tif"}, "labels": "fg", "class_label": cls,
                        "descriptions": ["synthetic"]})
    catalog = write_catalog(tmp_path / "catalog.yaml", entries)
    ingest_catalog(catalog, progress=False)
    split_ids = [f"data.catalog={catalog}", "data.train_ids=[v0,v1]", "data.val_ids=[v2]",
                 "data.test_ids=[v2]"]
    data = load_config(finetune_config_class("segment"), None, ["init=scratch", *split_ids]).data
    train = load_split(data, "train", label=True, class_field="class_label")
    assert [(p.stem, p.class_name, p.spatial_shape) for p in train] == [
        ("v0", "cell_nucleus", (40, 40, 40)), ("v1", "vessels", (40, 40, 40))]
    assert set(np.unique(train[1].label)) == {0, 1} and train[1].voxel_size == (2.0, 1.0, 1.0)
    run = tmp_path / "run"
    assert main(["finetune", "segment", "--out", str(run), *split_ids, "init=scratch", "shots=[2]",
                 "prediction_format=zarr", *FAST]) == 0
    (row,) = _rows(run)
    assert row["train_patches"] == "v0 v1" and 0.0 <= float(row["dice"]) <= 1.0
    from lsmfm.io.volumes import read_volume

    pred, voxel = read_volume(run / "scratch" / "shots2_seed0" / "predictions" / "v2_pred.ome.zarr")
    assert pred.shape == (40, 40, 40) and voxel == (2.0, 1.0, 1.0)


@pytest.mark.slow
def test_resume_after_kill_and_after_sigterm_reproduces_the_uninterrupted_results(dataset, tmp_path):
    """kill -9, --resume, SIGTERM (exit 75 after the current validation), --resume: the results.csv,
    per_image.csv and kept models of an uninterrupted run; each run has one TensorBoard events file."""
    import os

    from finetune_helpers import kill_resume_sigterm_resume

    args = ["finetune", "segment", *data_overrides(dataset), "init=scratch", "shots=[1,2]", "seeds=[0,1,2]",
            "train.max_steps=6", "train.val_every=2", "train.batch_size=1", "data.patch_size=[32,32,32]",
            "device=cpu", "keep=best", *TINY_BACKBONE]
    whole = tmp_path / "whole"
    assert main([*args, "--out", str(whole), "--quiet"]) == 0
    run = tmp_path / "run"
    rc, out = kill_resume_sigterm_resume(args, run, 6, {**os.environ, "OMP_NUM_THREADS": "1"})
    assert rc == 75 and "runs finished earlier, skipped" in out and "--resume to finish" in out, out
    assert 2 <= len(_rows(run)) < 6
    assert main([*args, "--out", str(run), "--quiet", "--resume"]) == 0
    assert _rows(run) == _rows(whole)
    assert (run / "per_image.csv").read_text() == (whole / "per_image.csv").read_text()
    kept = sorted(p.relative_to(run).as_posix() for p in run.glob("*/shots*_seed*"))
    assert kept == sorted(p.relative_to(whole).as_posix() for p in whole.glob("*/shots*_seed*"))
    assert all(len(list(d.glob("events.out.tfevents.*"))) == 1 for d in (run / "tb").iterdir())
    assert len(list((run / "tb").iterdir())) == 6


def test_a_full_disk_while_finetuning_is_one_line_naming_the_run(dataset, tmp_path):
    """A real short write: a file-size limit stops the run's largest file (a full disk or a quota does the
    same); the command ends in one line naming the run folder, not a RuntimeError/SafetensorError."""
    import os
    import resource
    import signal
    import subprocess

    from finetune_helpers import cli

    def limit_file_size() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails instead of killing the process
        resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, resource.RLIM_INFINITY))

    run = tmp_path / "run"
    args = ["finetune", "segment", *data_overrides(dataset), "init=scratch", "shots=[1]", "device=cpu",
            "keep=all", *FAST, "--out", str(run), "--quiet"]
    done = subprocess.run(cli(args), capture_output=True, text=True, timeout=600, preexec_fn=limit_file_size,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 1, done.stderr[-3000:]
    assert done.stderr == f"lsmfm finetune: error: {run}: file too large (a file-size limit, `ulimit -f`, " \
                          "or the file system's)\n", done.stderr[-3000:]
