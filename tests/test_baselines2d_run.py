"""Short few-shot runs of SAM+LoRA, PTSAM and DINOv2+LoRA (tiny random models) on the real 2D data, through
the CLI, with results.csv checked; the saved adapter reloads; domain analysis before and after adaptation."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import tifffile

from lsmfm.cli.main import main

REPO = Path(__file__).resolve().parents[1]
COLUMNS = [
    "shots",
    "seed",
    "init",
    "dice",
    "cldice",
    "iou",
    "seg_accuracy",
    "val_dice",
    "best_step",
    "model",
    "method",
    "trainable_params",
    "total_params",
    "annotated_pixels",
    "peak_memory_mb",
    "sec_per_iter",
    "train_seconds",
    "steps",
    "train_cases",
]
TINY = [
    "model.weights=",
    "model.size=tiny",
    "model.input_size=0",
    "seeds=[0]",
    "train.max_steps=2",
    "train.device=cpu",
    "save_predictions=true",
]
DATASETS = {
    "em": ["data.train_dir={root}/em_membrane_2d", "data.test_fraction=0.03", "shots=[1,2]"],
    "dsb": [
        "data.train_dir={root}/dsb_nuclei_2d",
        "data.image_glob=img*.tif",
        "data.label_glob=mask*.tif",
        "data.tile=128",
        "data.test_fraction=0.07",
        "shots=[2]",
    ],
}



def run_cli(config: str, dataset: str, root: Path, out: Path, *extra: str) -> list[dict[str, str]]:
    overrides = [o.format(root=root) for o in DATASETS[dataset]] + TINY + list(extra)
    args = ["baseline2d", "--config", str(REPO / "finetune" / f"baseline2d_{config}.yaml"), *overrides]
    dry = main(args + ["--dry-run"])
    assert dry == 0
    assert main(args + ["--out", str(out), "--quiet"]) == 0
    with open(out / "results.csv") as fh:
        reader = csv.DictReader(fh)
        assert reader.fieldnames == COLUMNS
        return list(reader)


@pytest.mark.parametrize("dataset", ["em", "dsb"])
@pytest.mark.parametrize("config", ["sam_lora", "ptsam", "dinov2_lora"])
def test_few_shot_run_on_real_2d_data(shared_data, tmp_path, capsys, config, dataset):
    capsys.readouterr()
    rows = run_cli(config, dataset, shared_data, tmp_path / "run")
    dry = json.loads(capsys.readouterr().out.splitlines()[0])
    shots = [1, 2] if dataset == "em" else [2]
    assert [(int(r["shots"]), int(r["seed"]), r["init"]) for r in rows] == [(s, 0, "scratch") for s in shots]
    for r in rows:
        assert int(r["trainable_params"]) == dry["trainable_params"]
        assert int(r["total_params"]) == dry["total_params"]
        assert all(0.0 <= float(r[m]) <= 1.0 for m in ("dice", "cldice", "iou", "seg_accuracy"))
        assert float(r["peak_memory_mb"]) > 0 and float(r["sec_per_iter"]) > 0 and int(r["steps"]) == 2
    if config == "ptsam":
        assert dry["trainable_params"] == 8 * 64  # 8 tokens of the tiny decoder's width
    out = tmp_path / "run"
    for name in (
        "config.yaml",
        "metrics.json",
        "dice_vs_shots.png",
        "seg_accuracy_vs_shots.png",
        "adapted/config.yaml",
        "adapted/trainable.safetensors",
    ):
        assert (out / name).is_file(), name
    preds = sorted((out / "predictions" / f"shots{shots[-1]}_seed0").glob("*.tif"))
    assert len(preds) == (1 if dataset == "em" else 2)
    assert tifffile.imread(preds[0]).shape == ((512, 512) if dataset == "em" else (128, 128))


def test_volumes_are_predicted_slice_by_slice_and_stacked_back_to_3d(shared_data, tmp_path):
    """3D instance-labelled volumes: a shot is a volume (its Z slices train); the test volume is scored in 3D."""
    from lsmfm.baselines2d.config import Baseline2DConfig
    from lsmfm.baselines2d.train import run_baseline
    from lsmfm.config import load_config

    cfg = load_config(Baseline2DConfig, REPO / "finetune" / "baseline2d_sam_lora.yaml",
                      [f"data.train_dir={shared_data}/confocal_nuclei_instances", "shots=[2]", *TINY])
    rows = run_baseline(cfg, tmp_path / "run", progress=False).rows
    assert len(rows) == 1 and 0.0 <= rows[0]["seg_accuracy"] <= 1.0
    assert rows[0]["annotated_pixels"] == 2 * 100 ** 3 and rows[0]["train_cases"] == "1135_mini 1136_mini"
    pred = tifffile.imread(tmp_path / "run" / "predictions" / "shots2_seed0" / "1137_mini.tif")
    assert pred.shape == (100, 100, 100)


def test_adapted_model_reloads_and_predicts_the_same(shared_data, tmp_path):
    import torch

    from lsmfm.baselines2d.build import load_adapted
    from lsmfm.baselines2d.data import load_splits
    from lsmfm.baselines2d.evaluate import predict_case
    from lsmfm.baselines2d.train import run_baseline
    from lsmfm.errors import InputError

    out = tmp_path / "run"
    run_cli("sam_lora", "em", shared_data, out, "peft.rank=4", "train.lr=0.01")
    model, cfg = load_adapted(out / "adapted")
    case = load_splits(cfg.data).test[0]
    pred = predict_case(model, case, torch.device("cpu"), 1, cfg.segment.threshold)[0]
    saved = tifffile.imread(out / "predictions" / "shots2_seed0" / f"{case.name}.tif") > 0
    assert np.array_equal(pred, saved)
    with pytest.raises(InputError, match="already exists"):
        run_baseline(cfg, out)


def test_domain_analysis_before_and_after_adaptation(shared_data, tmp_path, capsys):
    run = tmp_path / "run"
    run_cli("sam_lora", "dsb", shared_data, run)
    data = [
        str(shared_data / d) for d in ("em_membrane_2d", "dsb_nuclei_2d", "lsm_fm_samples/finetune/train")
    ]
    common = ["--data", *data, "--tile", "96", "--max-samples", "4", "--device", "cpu"]
    assert main(["analyze", "domains", "--adapted", str(run), *common, "--out", str(tmp_path / "d2")]) == 0
    report = json.loads((tmp_path / "d2" / "domains.json").read_text())
    assert set(report["results"]) == {"before", "after"}
    assert report["datasets"] == {"em_membrane_2d": 4, "dsb_nuclei_2d": 4, "lsm_fm_samples/finetune/train": 4}
    for r in report["results"].values():
        assert 0.0 <= r["separability"] <= 1.0 and r["chance"] == pytest.approx(1 / 3)
    assert (tmp_path / "d2" / "pca_before.png").is_file() and (tmp_path / "d2" / "pca_after.png").is_file()

    assert (
        main(
            [
                "analyze",
                "domains",
                "--encoder",
                "lsmfm3d:scratch",
                "--size",
                "tiny",
                *common,
                "--out",
                str(tmp_path / "d3"),
            ]
        )
        == 0
    )
    report = json.loads((tmp_path / "d3" / "domains.json").read_text())
    assert report["results"]["before"]["feature_dim"] == 16
    assert "separability" in capsys.readouterr().out


@pytest.mark.slow
def test_resume_after_kill_and_after_sigterm_reproduces_the_uninterrupted_results(shared_data, tmp_path):
    """The 2D baselines share the protocol's run folder: kill -9, --resume, SIGTERM (exit 75), --resume
    give the uninterrupted results.csv (timing columns aside), per_image.csv and predictions."""
    import os

    from finetune_helpers import kill_resume_sigterm_resume, results, without_timing

    args = ["baseline2d", "--config", str(REPO / "finetune" / "baseline2d_ptsam.yaml"),
            *[o.format(root=shared_data) for o in DATASETS["em"]], *TINY, "seeds=[0,1]",
            "train.max_steps=3"]
    whole = tmp_path / "whole"
    assert main([*args, "--out", str(whole), "--quiet"]) == 0
    run = tmp_path / "run"
    rc, out = kill_resume_sigterm_resume(args, run, 4, {**os.environ, "OMP_NUM_THREADS": "1"})
    assert rc == 75 and "runs finished earlier, skipped" in out, out
    assert main([*args, "--out", str(run), "--quiet", "--resume"]) == 0
    assert without_timing(results(run)) == without_timing(results(whole))
    assert (run / "per_image.csv").read_text() == (whole / "per_image.csv").read_text()
    for pred in (whole / "predictions").rglob("*.tif"):
        assert np.array_equal(tifffile.imread(pred), tifffile.imread(run / pred.relative_to(whole)))
    assert sorted(p.name for p in (run / "predictions").iterdir()) == [
        f"shots{k}_seed{s}" for k in (1, 2) for s in (0, 1)]
