"""Pretraining validation: whole volumes held out, the validation loss logged, the best checkpoint kept
past pruning, patience, resume of the best score, and the training stream never reading a held-out entry."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from pretrain_helpers import TINY, synthetic_catalog, tiny_overrides

from lsmfm.config import load_config
from lsmfm.data.stream.dataset import PatchStream
from lsmfm.data.stream.split import split_entries
from lsmfm.errors import ConfigError
from lsmfm.training.logging import read_jsonl
from lsmfm.training.pretrain import PretrainConfig, pretrain

TERMS = {"recon", "distill", "distill_global", "clip", "align"}


@pytest.fixture(scope="module")
def catalog(tmp_path_factory) -> Path:
    return synthetic_catalog(tmp_path_factory.mktemp("stores"))


def run_config(catalog: Path, steps: int, **extra: object) -> PretrainConfig:
    overrides = tiny_overrides(catalog, steps, **{"validation.fraction": 0.5, "validation.every": 2,
                                                  "validation.batches": 1, "train.image_every": 0,
                                                  "train.checkpoint_every": 100, "train.keep_checkpoints": 1,
                                                  **extra})
    return load_config(PretrainConfig, TINY, overrides)


def test_split_holds_out_whole_entries_like_the_paper_count():
    ids = [f"vol{i}" for i in range(10)]
    train, val = split_entries(ids, 0.1, seed=100)
    assert len(train) == 9 and len(val) == 1 and set(train) | set(val) == set(ids)  # int(0.9 * 10) train
    assert split_entries(ids, 0.1, seed=100) == (train, val)
    assert split_entries(ids, 0.1, seed=1) != (train, val)
    assert [len(v) for _, v in (split_entries(ids[:3], 0.1, 0), split_entries(ids[:2], 0.5, 0))] == [1, 1]
    assert split_entries(["a", "b", "a"], 0.5, 0)[1] in (["a"], ["b"])  # one id, one volume
    with pytest.raises(ConfigError, match="both need at least one"):
        split_entries(["only"], 0.5, 0)


def test_stream_of_a_split_reads_only_its_entries(catalog):
    cfg = run_config(catalog, 1)
    train, val = split_entries(["cell_nucleus", "vessels"], 0.5, cfg.train.seed)
    stream = PatchStream(cfg.data, seed=0, entries=train)
    assert {stream.locate(i).source for i in range(20)} == set(train)
    assert {s.id for s in PatchStream(cfg.data, seed=0, entries=val).sources} == set(val)


@pytest.mark.slow
def test_validation_logged_best_checkpoint_kept_and_resumed(catalog, tmp_path):
    run = tmp_path / "run"
    cfg = run_config(catalog, 4)
    metrics = pretrain(cfg, run, progress=False)
    rows = read_jsonl(run / "validation.jsonl")
    assert [r["step"] for r in rows] == [2, 4] and TERMS <= set(rows[0])
    assert all(r["loss"] == pytest.approx(sum(r[k] for k in TERMS - {"align"}) + 0.0 * r["align"])
               for r in rows)  # the tiny recipe's training weights: 1, 1, 1, 1 and align 0
    # the KL is the cross-entropy less the teacher's entropy: between 0 and the cross-entropy
    assert all(0.0 <= r["distill_kl"] <= r["distill"] and 0.0 <= r["distill_global_kl"] <= r["distill_global"]
               for r in rows)
    best = min(rows, key=lambda r: r["loss"])
    tag = f"step_{best['step']:08d}"
    assert (run / "checkpoints" / "best").read_text() == tag and (run / "checkpoints" / tag).is_dir()
    assert (run / "checkpoints" / "latest").read_text() == "step_00000004"  # keep 1 spares the best
    assert metrics["validation"] == {"best_loss": best["loss"], "best_step": best["step"],
                                     "bad": 0 if best["step"] == 4 else 1, "tag": tag}
    state = torch.load(run / "checkpoints" / "step_00000004" / "mp_rank_00_model_states.pt",
                       map_location="cpu", weights_only=False)
    assert state["validation"]["best_loss"] == best["loss"]
    from lsmfm.weights.export import export_run

    exported = export_run(run, tmp_path / "best_weights", tag="best")
    assert json.loads((exported / "config.json").read_text())["pretraining"]["steps"] == best["step"]

    resumed = pretrain(run_config(catalog, 6), run, resume=True, progress=False)
    rows = read_jsonl(run / "validation.jsonl")
    assert [r["step"] for r in rows] == [2, 4, 6]
    assert resumed["validation"]["best_loss"] == min(r["loss"] for r in rows)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tb"))
    acc.Reload()
    assert {"val/loss", "val/recon", "val/clip"} <= set(acc.Tags()["scalars"])


@pytest.mark.slow
def test_patience_stops_the_run_and_the_validation_weights_are_used(catalog, tmp_path):
    """All-zero validation weights: the first score (0) is the best and never beaten, so patience 1
    stops at the second validation; the run ends early with a checkpoint."""
    run = tmp_path / "run"
    metrics = pretrain(run_config(catalog, 8, **{"validation.weights": "{recon: 0.0}",
                                                 "validation.patience": 1}), run, progress=False)
    assert metrics["step"] == 4 and metrics["stopped_early"]
    assert [r["loss"] for r in read_jsonl(run / "validation.jsonl")] == [0.0, 0.0]
    assert (run / "checkpoints" / "best").read_text() == "step_00000002"
    assert json.loads((run / "metrics.json").read_text())["validation"]["bad"] == 1


def test_bad_validation_config_fails_before_work(catalog, tmp_path):
    with pytest.raises(ConfigError, match="validation.weights"):
        run_config(catalog, 2, **{"validation.weights": "{clips: 1.0}"})
    with pytest.raises(ConfigError, match="validation.fraction"):
        run_config(catalog, 2, **{"validation.fraction": 1.0})
    single = tmp_path / "one.yaml"
    single.write_text(Path(catalog).read_text().split("- id: vessels")[0])
    with pytest.raises(ConfigError, match="leaves 0 to train"):
        pretrain(run_config(single, 2), tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()
