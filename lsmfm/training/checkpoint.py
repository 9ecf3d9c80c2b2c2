"""Resumable, atomic pretraining checkpoints written by DeepSpeed.

Layout of a run folder::

    RUN_DIR/
      config.yaml                    resolved PretrainConfig: data (StreamConfig), model (SSLConfig), train
      checkpoints/
        latest                       text file naming the newest complete tag, e.g. "step_00000500"
        best                         with validation: names the tag of the best validation loss (kept by
                                     the pruning of old tags)
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

Safety: a tag (from `latest` or `--tag`) must be a plain name whose folder lies inside the run's
`checkpoints/` (no separator, no `..`, no symlink leading out). Every file of a tag is read weights-only
(`lsmfm.weights.torchfile`), DeepSpeed's own loader included, so a pickle carrying code is refused and
never run. A tag whose files are truncated or corrupt (a full disk, a bad copy) is set aside as
`broken_<tag>` and the newest intact one is resumed, with a warning naming both.
"""
from __future__ import annotations

import os
import random
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from lsmfm.errors import InputError, LsmfmWarning
from lsmfm.io.atomic import atomic_write_text
from lsmfm.provenance import KEY as PROVENANCE_KEY, provenance
from lsmfm.training import distributed

TMP_PREFIX = ".tmp_"
BROKEN_PREFIX = "broken_"


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
    tag_path(run_dir, tag, source=latest)
    if not (checkpoint_dir(run_dir) / tag).is_dir():
        raise InputError(latest, f"names checkpoint {tag!r}, which does not exist")
    return tag


def tag_path(run_dir: str | Path, tag: str, source: str | Path | None = None) -> Path:
    """`RUN_DIR/checkpoints/<tag>`, refused unless `tag` is a plain name whose folder (symlinks followed)
    lies inside the run's checkpoints folder; `source`: where the tag came from, for the message."""
    root = checkpoint_dir(run_dir)
    where = source if source is not None else root
    plain = tag and tag not in (".", "..") and not any(c in tag for c in ("/", "\\", os.sep, "\0"))
    if not plain:
        raise InputError(where, f"checkpoint tag {tag!r} is not a plain folder name inside {root}; refused")
    path = root / tag
    # against the real `checkpoints/` folder: it may itself be a link to scratch storage
    inside = Path(os.path.realpath(path)).is_relative_to(Path(os.path.realpath(root)))
    if path.exists() and not inside:
        raise InputError(where, f"checkpoint tag {tag!r} leads outside the run folder "
                                f"({os.path.realpath(path)}); refused")
    return path


def has_checkpoints(run_dir: str | Path) -> bool:
    """Whether the run folder holds checkpoints (intact or not)."""
    return (checkpoint_dir(run_dir) / "latest").is_file() or bool(step_tags(run_dir))


def step_tags(run_dir: str | Path) -> list[str]:
    """Complete-looking tags, newest step first."""
    root = checkpoint_dir(run_dir)
    return sorted((p.name for p in root.glob("step_*") if p.is_dir()), reverse=True) if root.is_dir() else []


def tag_files(tag_dir: Path) -> list[Path]:
    return sorted(tag_dir.glob("*.pt"))


def unreadable(tag_dir: Path) -> str | None:
    """Why a tag cannot be resumed (missing model states, a truncated or corrupt file), or None.

    Files are opened weights-only with mmap, so this reads the pickles, not the tensor data. A file that
    carries code raises InputError: that is an attack, not damage, and nothing falls back from it.
    """
    from lsmfm.weights.torchfile import UnsafeCheckpointError, load_torch_file

    if not (tag_dir / "mp_rank_00_model_states.pt").is_file():
        return "no mp_rank_00_model_states.pt"
    for f in tag_files(tag_dir):
        try:
            load_torch_file(f, deepspeed=True)
        except UnsafeCheckpointError:
            raise
        except InputError as exc:
            return f"{f.name}: {exc.problem}"
    return None


def resume_tag(run_dir: str | Path) -> str | None:
    """The newest intact tag, `latest` first; damaged newer tags are set aside (rank 0) with a warning."""
    root = checkpoint_dir(run_dir)
    problems: list[str] = []
    first = None
    if (root / "latest").is_file():
        name = (root / "latest").read_text().strip()
        if tag_path(run_dir, name, source=root / "latest").is_dir():
            first = name
        else:
            problems.append(f"latest names {name!r}, which does not exist")
    candidates = ([first] if first else []) + [t for t in step_tags(run_dir) if t != first]
    for tag in candidates:
        why = unreadable(tag_path(run_dir, tag))
        if why is None:
            if problems:
                _set_aside(root, candidates[:candidates.index(tag)], tag)
                warnings.warn(LsmfmWarning(f"{root}: {'; '.join(problems)}; resuming from the newest intact "
                                           f"checkpoint {tag}"), stacklevel=2)
            return tag
        problems.append(f"{tag} is unreadable ({why})")
    if problems:
        raise InputError(root, f"no intact checkpoint to resume: {'; '.join(problems)}")
    return None


def _set_aside(root: Path, tags: list[str], intact: str) -> None:
    """Rename damaged tags to `broken_<tag>` (kept for inspection, out of the way of later saves) and
    point `latest` at the intact tag resumed from."""
    distributed.barrier()
    if distributed.ensure_env().is_main:
        for tag in tags:
            if (root / tag).is_dir():
                os.replace(root / tag, root / (BROKEN_PREFIX + tag))
        atomic_write_text(root / "latest", intact)
    distributed.barrier()


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


def best_tag(run_dir: str | Path) -> str | None:
    """The tag named by `checkpoints/best` (the best validation loss), or None; checked like `latest`."""
    best = checkpoint_dir(run_dir) / "best"
    if not best.is_file():
        return None
    tag = best.read_text().strip()
    tag_path(run_dir, tag, source=best)
    return tag


def save(engine: Any, run_dir: str | Path, step: int, client_state: dict[str, Any], keep: int = 0,
         best: bool = False) -> str:
    """Collective: save a checkpoint of `engine` at `step`; per-rank RNG states are gathered into it.

    A step that already has a complete tag is not saved again. `best` marks the tag in
    `checkpoints/best`. `keep` > 0 deletes older tags beyond the newest `keep`, except the best one.
    Returns the tag.
    """
    root = checkpoint_dir(run_dir)
    tag = tag_for(step)
    if (root / tag).is_dir():
        if best and engine.global_rank == 0:
            atomic_write_text(root / "best", tag)
        distributed.barrier()
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
        if best:
            atomic_write_text(root / "best", tag)
        if keep > 0:
            _prune(root, keep, best_tag(run_dir))
    distributed.barrier()
    return tag


def load(engine: Any, run_dir: str | Path) -> dict[str, Any] | None:
    """Collective: load the newest intact checkpoint into `engine`; returns its client state (None if there
    is none). Every file is unpickled weights-only (`no_pickled_code`), never running pickled code.

    RNG states are not restored here: the caller does it with `restore_rng(state["rng"][rank])` right
    before the first resumed step, after anything that draws from the global RNG while setting up
    (a DataLoader iterator draws its base seed from it).
    """
    from lsmfm.weights.torchfile import no_pickled_code

    tag = resume_tag(run_dir)
    if tag is None:
        return None
    root = checkpoint_dir(run_dir)
    if engine.global_rank == 0:
        remove_stale(root)
    with no_pickled_code(tag_files(root / tag)):
        path, state = engine.load_checkpoint(str(root), tag=tag, load_optimizer_states=True,
                                             load_lr_scheduler_states=False)
    if path is None:
        raise InputError(root / tag, "DeepSpeed could not load this checkpoint")
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


def _prune(root: Path, keep: int, protected: str | None = None) -> None:
    tags = sorted(p for p in root.glob("step_*") if p.is_dir())
    for old in tags[:-keep]:
        if old.name != protected:
            shutil.rmtree(old, ignore_errors=True)
