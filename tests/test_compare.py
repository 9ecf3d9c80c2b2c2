"""`lsmfm compare`: every arm kind with tiny random models (a 3D pretrained source, scratch, 2D SAM + LoRA,
2D PTSAM) through the real CLI; the 3D arms reproduce `lsmfm finetune` (one trainer); the matched
budget (a 2D arm sees only the slices of its shots' training volumes); resume after kill -9 and after
SIGTERM reproduces the uninterrupted results.csv; the run folder and config rules."""
from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import numpy as np
import pytest
from finetune_helpers import (
    TIMING,
    data_overrides,
    kill_resume_sigterm_resume,
    results,
    without_timing,
    write_dataset,
)

from lsmfm.cli.main import main
from lsmfm.models.backbones.registry import build_backbone
from lsmfm.models.backbones.unet import UNetConfig

FAST = ["train.max_steps=2", "train.val_every=2", "train.batch_size=2", "device=cpu", "seeds=[0]"]
SAM_LORA = "{name: sam_lora, kind: baseline2d, model: {size: tiny}, peft: {method: lora, rank: 4}}"
PTSAM = "{name: ptsam, kind: baseline2d, model: {size: tiny}, peft: {method: ptsam, n_tokens: 4}}"


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return write_dataset(tmp_path_factory.mktemp("patches") / "finetune", n_train=2, n_eval=1, size=32)


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    net = build_backbone(UNetConfig(channels=[8, 16, 32], strides=[2, 2], out_channels=8, num_res_units=1))
    return net.save_pretrained(tmp_path_factory.mktemp("weights") / "unet", patch_size=[32, 32, 32])


def _arms(*arms: str) -> str:
    return f"arms=[{', '.join(arms)}]"


def _pretrained(weights: Path) -> str:
    return f"{{name: unet, kind: pretrained, source: {weights}}}"


def test_every_arm_kind_through_the_cli(dataset, weights, tmp_path, capsys):
    run = tmp_path / "run"
    argv = ["compare", "segment", "--out", str(run), *data_overrides(dataset), "shots=[1,2]", *FAST,
            _arms(_pretrained(weights), "{name: scratch, kind: scratch}", SAM_LORA, PTSAM)]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "| arm | kind | shots | seeds | dice | cldice | iou |" in out and "| ptsam | 2d | 2 | 1 |" in out
    rows = results(run)
    assert list(rows[0])[:7] == ["arm", "kind", "shots", "seed", "dice", "cldice", "iou"]
    for column in ("trainable_params", "annotated_voxels", *TIMING, "val_dice", "steps", "train_patches"):
        assert column in rows[0]
    assert [(r["arm"], r["kind"], r["shots"]) for r in rows] == [
        (a, k, s) for s in "12" for a, k in (("unet", "3d"), ("scratch", "3d"), ("sam_lora", "2d"),
                                             ("ptsam", "2d"))]
    for r in rows:
        assert all(0.0 <= float(r[m]) <= 1.0 for m in ("dice", "cldice", "iou"))
        volumes = len(r["train_patches"].split())
        assert int(r["annotated_voxels"]) == 32 ** 3 * int(r["shots"]) == 32 ** 3 * volumes
        assert float(r["train_seconds"]) > 0 and float(r["peak_memory_mb"]) > 0 and int(r["steps"]) == 2
    by_arm = {r["arm"]: r for r in rows if r["shots"] == "2"}
    assert len({by_arm[a]["train_patches"] for a in ("unet", "scratch", "sam_lora", "ptsam")}) == 1
    # PTSAM trains only its prompt tokens (4 x 64); LoRA rank 4 on q and v plus SAM's mask decoder
    assert int(by_arm["ptsam"]["trainable_params"]) == 4 * 64
    assert int(by_arm["sam_lora"]["trainable_params"]) > int(by_arm["ptsam"]["trainable_params"])
    assert by_arm["unet"]["trainable_params"] == by_arm["scratch"]["trainable_params"]
    summary = json.loads((run / "metrics.json").read_text())["summary"]
    assert {(e["arm"], e["kind"], e["shots"], e["n_seeds"]) for e in summary} == {
        (a, k, s, 1) for s in (1, 2) for a, k in (("unet", "3d"), ("scratch", "3d"), ("sam_lora", "2d"),
                                                  ("ptsam", "2d"))}
    for m in ("dice", "cldice", "iou"):
        assert (run / f"{m}_vs_shots.png").read_bytes()[:4] == b"\x89PNG"
    table = (run / "results.md").read_text()
    assert table.startswith("| arm | kind |") and table.count("\n") == 2 + 8
    with open(run / "per_image.csv") as fh:
        per_image = list(csv.DictReader(fh))
    assert len(per_image) == 8 * 3
    assert {p["arm"] for p in per_image} == {"unet", "scratch", "sam_lora", "ptsam"}
    assert sorted(p.name for p in (run / "tb").iterdir()) == sorted(
        f"{a}_shots{s}_seed0" for a in ("unet", "scratch", "sam_lora", "ptsam") for s in (1, 2))
    _check_kept(run, dataset)


def _check_kept(run: Path, dataset: dict[str, Path]) -> None:
    """3D arms keep finetuned model folders, 2D arms their adapters; both the stacked 3D test masks."""
    import nibabel as nib

    from lsmfm.baselines2d.build import load_adapted
    from lsmfm.tasks.models import load_task_model

    model, config = load_task_model(run / "unet" / "shots2_seed0" / "model")
    assert config.task["finetuning"]["arm"] == "unet" and config.task["finetuning"]["shots"] == 2
    net, adapted = load_adapted(run / "sam_lora" / "shots2_seed0" / "adapted")
    assert adapted.peft.method == "lora" and adapted.peft.rank == 4
    stems = sorted(p.name[:-len(".nii.gz")] for p in dataset["test"].glob("*_ch0.nii.gz"))
    for arm in ("unet", "scratch", "sam_lora", "ptsam"):
        preds = sorted((run / arm / "shots2_seed0" / "predictions").iterdir())
        assert [p.name for p in preds] == [f"{s}_pred.nii.gz" for s in stems]
        assert nib.load(str(preds[0])).shape == (32, 32, 32)


@pytest.mark.parametrize("bn_stats", ["keep", "reestimate"])
def test_3d_arms_reproduce_lsmfm_finetune(dataset, weights, tmp_path, bn_stats):
    """The same trainer, seeds and volumes: compare's pretrained and scratch rows are finetune's."""
    common = [*data_overrides(dataset), "shots=[1]", "seeds=[0,1]", "train.max_steps=3", "train.val_every=3",
              "train.batch_size=1", "device=cpu"]
    assert main(["finetune", "segment", "--out", str(tmp_path / "ft"), "--quiet", f"pretrained={weights}",
                 f"bn_stats={bn_stats}", *common]) == 0
    arm = f"{{name: unet, kind: pretrained, source: {weights}, bn_stats: {bn_stats}}}"
    assert main(["compare", "segment", "--out", str(tmp_path / "cmp"), "--quiet", *common,
                 _arms(arm, "{name: scratch, kind: scratch}")]) == 0
    finetune = {(r["init"], r["seed"]): r for r in results(tmp_path / "ft")}
    for r in results(tmp_path / "cmp"):
        twin = finetune[("pretrained" if r["arm"] == "unet" else "scratch", r["seed"])]
        for column in ("dice", "cldice", "iou", "val_dice", "best_step", "steps", "train_patches"):
            assert r[column] == twin[column], column


def test_a_2d_arm_sees_only_the_slices_of_its_training_volumes(dataset, monkeypatch, tmp_path):
    """Matched budget: every slice a 2D arm trains on is a Z slice of one of its run's training volumes."""
    from lsmfm.baselines2d.task import SliceModel
    from lsmfm.compare.config import compare_config_class
    from lsmfm.compare.run import plan_compare, run_compare
    from lsmfm.config import load_config

    seen: list[np.ndarray] = []
    forward = SliceModel.forward

    def record(self, images):
        if self.training:
            seen.extend(images[:, 0].numpy())
        return forward(self, images)

    monkeypatch.setattr(SliceModel, "forward", record)
    cfg = load_config(compare_config_class("segment"), None, [
        *data_overrides(dataset), "shots=[1,2]", "seeds=[0]", "train.max_steps=6", "train.val_every=6",
        "train.batch_size=2", "train.flips=false", "device=cpu", _arms(SAM_LORA)])
    plan = plan_compare("segment", cfg)
    arm = plan.arms[0]
    runs = []
    for shots in (1, 2):
        seen.clear()
        train = plan.subsets[(shots, 0)]
        arm.prepare()
        arm.train(train, 0, tmp_path / f"tb{shots}", "budget", False, lambda: False)
        runs.append((train, list(seen)))
    volumes = arm.cases["train"]
    for train, slices in runs:
        assert len(slices) == 6 * 2
        for image in slices:
            sources = {i for i, case in enumerate(volumes)
                       if any(np.array_equal(image, s) for s in case.image)}
            assert sources and sources <= set(train), (sources, train)
    assert [len(train) for train, _ in runs] == [1, 2]
    outcome = run_compare(plan, tmp_path / "run", progress=False)
    assert [r["annotated_voxels"] for r in outcome.rows] == [32 ** 3, 2 * 32 ** 3]


@pytest.mark.slow
def test_resume_after_kill_and_after_sigterm_reproduces_the_uninterrupted_results(dataset, tmp_path):
    args = ["compare", "segment", *data_overrides(dataset), "shots=[1,2]", "seeds=[0,1]", "train.max_steps=4",
            "train.val_every=2", "train.batch_size=2", "device=cpu", "data.patch_size=[32,32,32]",
            "backbone.channels=[8,16,32]", "backbone.strides=[2,2]", "backbone.out_channels=8",
            "backbone.num_res_units=1", _arms("{name: scratch, kind: scratch}", PTSAM)]
    assert main([*args, "--out", str(tmp_path / "whole"), "--quiet"]) == 0
    whole = results(tmp_path / "whole")
    assert len(whole) == 8
    run = tmp_path / "run"
    rc, out = kill_resume_sigterm_resume(args, run, 8, {**os.environ, "OMP_NUM_THREADS": "1"})
    assert rc == 75, out
    assert "runs finished earlier, skipped" in out and "--resume to finish" in out
    assert 2 <= len(results(run)) < 8
    assert main([*args, "--out", str(run), "--quiet", "--resume"]) == 0
    assert without_timing(results(run)) == without_timing(whole)
    assert (run / "per_image.csv").read_text() == (tmp_path / "whole" / "per_image.csv").read_text()
    summary = [json.loads((r / "metrics.json").read_text())["summary"] for r in (run, tmp_path / "whole")]
    assert summary[0] == summary[1]
    names = sorted(p.name for p in (run / "tb").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "whole" / "tb").iterdir())
    assert all(len(list(d.glob("events.out.tfevents.*"))) == 1 for d in (run / "tb").iterdir())
    assert sorted(p.relative_to(run).as_posix() for p in run.glob("*/shots*_seed*")) == sorted(
        p.relative_to(tmp_path / "whole").as_posix() for p in (tmp_path / "whole").glob("*/shots*_seed*"))


def test_run_folder_rules_and_config_errors(dataset, weights, tmp_path, capsys):
    base = ["compare", "segment", *data_overrides(dataset), "shots=[1]", *FAST,
            _arms(_pretrained(weights))]
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    for flag in ("--overwrite", "--resume"):
        assert main([*base, "--out", str(foreign), flag]) == 1
        assert "is not a run folder of `lsmfm compare segment`" in capsys.readouterr().err
    assert (foreign / "notes.txt").read_text() == "keep me"
    run = tmp_path / "run"
    assert main([*base, "--out", str(run), "--quiet"]) == 0
    assert main([*base, "--out", str(run), "--quiet", "--resume"]) == 0
    assert "1 of 1 runs finished earlier, skipped (unet_shots1_seed0)" in capsys.readouterr().out
    assert main([*base, "--out", str(run), "--resume", "arms.0.options={which: teacher}"]) == 1
    assert "arms differ" in capsys.readouterr().err  # a list entry set by its index, compared whole
    assert main([*base, "--out", str(run), "--resume", "train.lr=0.5"]) == 1
    assert "train.lr differ" in capsys.readouterr().err
    for bad, message in [
        ("arms=[{name: a, kind: pretrained, source: x, options: {wich: student}}]",
         "unknown load_pretrained option(s) ['wich']"),
        ("arms=[{name: a, kind: scratch, source: x}]", "`source` does not apply to kind scratch"),
        ("arms=[{name: a, kind: scratch, bn_stats: reestimate}]", "`bn_stats` and `scale` do not apply"),
        ("arms=[{name: tb, kind: scratch}]", "arm name 'tb'"),
        ("arms=[{name: a, kind: scratch, train: {lrr: 1}}]", "arms[0].train.lrr"),
        ("arms=[]", "arms must list at least one arm"),
    ]:
        assert main([*base[:-1], "--out", str(tmp_path / "bad"), bad]) == 1
        assert message in capsys.readouterr().err
    assert main(["compare", "classify", "--out", str(tmp_path / "c"), *data_overrides(dataset), *FAST,
                 _arms(SAM_LORA)]) == 1
    assert "the 2D baselines are segmentation models" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists() and not (tmp_path / "c").exists()
