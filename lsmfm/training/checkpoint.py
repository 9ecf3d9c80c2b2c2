"""Resumable, atomic pretraining checkpoints written by DeepSpeed.

Layout of a run folder::

    RUN_DIR/
      config.yaml                    resolved PretrainConfig: data (StreamConfig), model (SSLConfig), train
      checkpoints/
        latest                       text file naming the newest complete tag, e.g. "step_00000500"
        step_00000500/               one tag, written by `engine.save_checkpoint`
          mp_rank_00_model_states.pt   module state dict of SSLModel ("module": keys student.backbone.*,
                                       teacher.backbone.*, heads, loss centres, ...) and the client state
          zero_pp_rank_<r>_mp_rank_00_optim_states.pt   optimizer state of data-parallel rank r (ZeRO)
          config.yaml                  the resolved config again, so a tag is self-contained
      tb/                            TensorBoard event files
      losses.jsonl                   one line per optimizer step: step, loss, each term
      metrics.json                   final loss terms and monitors

The client state (in `mp_rank_00_model_states.pt`, key by key) holds: `step` (optimizer steps done),
`samples` (samples consumed per rank, the data stream's `start_index` on resume), `rng` (per rank:
python, numpy, torch CPU and CUDA states), `provenance` (the lsmfm version and git commit that
wrote it), `scheduler` (the values of the lr/momentum/temperature
schedules at `step`), `teacher_updates`, and `config` (the resolved config as a dict).

Atomicity: every rank writes into `checkpoints/.tmp_<tag>/`; after all ranks finish, rank 0 fsyncs the
files, renames the folder to `<tag>` and only then replaces `latest` (itself written to a temporary file
and renamed). A kill -9 at any moment therefore leaves `latest` naming a complete tag; stale `.tmp_*`
folders are removed at the next save or resume.
"""
from __future__ import annotations

import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from lsmfm.errors import InputError
from lsmfm.io.atomic import atomic_write_text
from lsmfm.provenance import KEY as PROVENANCE_KEY, provenance
from lsmfm.training import distributed

TMP_PREFIX = ".tmp_"


def checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def latest_tag(run_dir: str | Path) -> str | None:
    """The tag named by `checkpoints/latest`, or None when the run has no complete checkpoint."""
    latest = checkpoint_dir(run_dir) / "latest"
    if not latest.is_file():
        return None
    tag = latest.read_text().strip()
    if not (checkpoint_dir(run_dir) / tag).is_dir():
        raise InputError(latest, f"names checkpoint {tag!r}, which does not exist")
    return tag


def capture_rng() -> dict[str, Any]:
    """This process's random states (python, numpy, torch CPU, and CUDA when present)."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(engine: Any, run_dir: str | Path, step: int, client_state: dict[str, Any], keep: int = 0) -> str:
    """Collective: save a checkpoint of `engine` at `step`; per-rank RNG states are gathered into it.

    A step that already has a complete tag is not saved again. `keep` > 0 deletes older tags beyond
    the newest `keep`. Returns the tag.
    """
    root = checkpoint_dir(run_dir)
    tag = tag_for(step)
    if (root / tag).is_dir():
        return tag
    tmp_tag = TMP_PREFIX + tag
    distributed.barrier()
    if engine.global_rank == 0:
        remove_stale(root)
    distributed.barrier()
    state = dict(client_state, step=step, rng=distributed.gather_objects(capture_rng()),
                 provenance=provenance())
    engine.save_checkpoint(str(root), tag=tmp_tag, client_state=state, save_latest=False)
    if engine.global_rank == 0:
        _commit(root, tmp_tag, tag, state.get("config"))
        if keep > 0:
            _prune(root, keep)
    distributed.barrier()
    return tag


def load(engine: Any, run_dir: str | Path) -> dict[str, Any] | None:
    """Collective: load the latest checkpoint into `engine`; returns its client state (None if there is none).

    RNG states are not restored here: the caller does it with `restore_rng(state["rng"][rank])` right
    before the first resumed step, after anything that draws from the global RNG while setting up
    (a DataLoader iterator draws its base seed from it).
    """
    tag = latest_tag(run_dir)
    if tag is None:
        return None
    if engine.global_rank == 0:
        remove_stale(checkpoint_dir(run_dir))
    path, state = engine.load_checkpoint(str(checkpoint_dir(run_dir)), tag=tag, load_optimizer_states=True,
                                         load_lr_scheduler_states=False)
    if path is None:
        raise InputError(checkpoint_dir(run_dir) / tag, "DeepSpeed could not load this checkpoint")
    return state


def remove_stale(root: Path) -> None:
    """Delete half-written `.tmp_*` tags left by a killed save."""
    if root.is_dir():
        for p in root.glob(TMP_PREFIX + "*"):
            shutil.rmtree(p, ignore_errors=True)


def _commit(root: Path, tmp_tag: str, tag: str, config: dict[str, Any] | None) -> None:
    tmp = root / tmp_tag
    if config is not None:
        data = {**config, PROVENANCE_KEY: provenance()}
        (tmp / "config.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    for f in tmp.rglob("*"):
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    os.replace(tmp, root / tag)
    atomic_write_text(root / "latest", tag)


def _prune(root: Path, keep: int) -> None:
    tags = sorted(p for p in root.glob("step_*") if p.is_dir())
    for old in tags[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
