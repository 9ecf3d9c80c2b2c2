"""The run folder of a few-shot protocol (`lsmfm finetune`, `lsmfm baseline2d`, `lsmfm compare`): one row
per finished run, the tables rewritten after every run, resume, and stopping on a signal.

    RUN_DIR/.lsmfm-protocol   which command made the folder (so --overwrite and --resume know it is ours)
    RUN_DIR/config.yaml       the resolved config, written before the first run
    RUN_DIR/results.csv, metrics.json, per_image.csv   the finished runs, in plan order

`--resume` reopens a folder made by the same command with the same config: finished runs (their rows in
metrics.json) are skipped and said so, the interrupted run starts again from scratch (its partial
TensorBoard folder is removed first), and the tables come out as an uninterrupted run writes them.
SIGTERM and SIGUSR1 (a cluster's notice before preemption) let the current validation finish, drop
the unfinished run and stop after writing the tables of the finished ones.
"""
from __future__ import annotations

import csv
import io
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Hashable, Iterable, Sequence

import yaml

from lsmfm.config import read_yaml, save_config, to_dict
from lsmfm.errors import InputError
from lsmfm.io.atomic import atomic_write_text
from lsmfm.provenance import KEY as PROVENANCE_KEY
from lsmfm.signals import StopRequest
from lsmfm.tasks.results import Layout, write_results

MARKER = ".lsmfm-protocol"
LEGACY_MARKERS = ("config.yaml", "results.csv")  # finetune run folders made before MARKER existed
STOPPED = 75  # exit status of a stopped protocol (EX_TEMPFAIL: not finished; --resume continues)


@dataclass
class Outcome:
    """The finished rows (plan order), how many were finished before a resume, and whether a signal
    stopped the protocol."""

    rows: list[dict[str, Any]]
    resumed: int
    stopped: bool


def is_run_folder(out_dir: Path, command: str) -> bool:
    """Whether `out_dir` was made by `command` (its marker; finetune's older folders by their files)."""
    marker = out_dir / MARKER
    if marker.is_file():
        return marker.read_text().strip() == command
    return command.startswith("lsmfm finetune") and all((out_dir / n).is_file() for n in LEGACY_MARKERS)


def check_run_dir(out_dir: str | Path, command: str, overwrite: bool = False, resume: bool = False) -> None:
    """RUN_DIR must be new or empty, or (with `overwrite`) a run folder of `command`, replaced, or
    (with `resume`) a run folder of `command`, continued. Never any other folder."""
    out_dir = Path(out_dir)
    if overwrite and resume:
        raise InputError(out_dir, "--overwrite and --resume exclude each other: replace the run or "
                                  "continue it")
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError(out_dir, "is an existing file, not a run folder; choose a new --out")
    if not out_dir.is_dir() or not any(out_dir.iterdir()):
        return
    if not overwrite and not resume:
        raise InputError(out_dir, "run folder already exists and is not empty; continue it with --resume, "
                                  "replace it with --overwrite, or choose a new --out")
    if not is_run_folder(out_dir, command):
        raise InputError(out_dir, f"is not a run folder of `{command}`; --overwrite and --resume touch only "
                                  "those")


def config_differences(saved: Any, current: Any, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two plain configs (lists compared whole)."""
    if isinstance(saved, dict) and isinstance(current, dict):
        return [d for k in dict.fromkeys([*saved, *current])
                for d in config_differences(saved.get(k), current.get(k), f"{prefix}{k}.")]
    return [] if saved == current else [prefix.rstrip(".")]


class RunFolder:
    """The tables of one protocol in RUN_DIR; `plan` lists every run's key in order (key: the values of
    `layout.keys`)."""

    def __init__(self, out_dir: str | Path, command: str, layout: Layout, metrics: Sequence[str],
                 plan: Iterable[tuple[Hashable, ...]]) -> None:
        self.out_dir, self.command, self.layout = Path(out_dir), command, layout
        self.metrics = list(metrics)
        self.order = {key: i for i, key in enumerate(plan)}
        self.rows: dict[tuple, dict[str, Any]] = {}
        self.per_image: dict[tuple, list[dict[str, Any]]] = {}

    def key(self, row: dict[str, Any]) -> tuple:
        return tuple(row[k] for k in self.layout.keys)

    def start(self, cfg: Any, resume: bool) -> list[tuple]:
        """Create the folder (marker, config.yaml) or reopen it for `resume`; returns the finished keys."""
        self.out_dir.mkdir(parents=True, exist_ok=True)
        if resume and (self.out_dir / "config.yaml").is_file():
            self._check_config(cfg)
            self._load()
        elif resume and any(self.out_dir.iterdir()):
            raise InputError(self.out_dir, "has no config.yaml: nothing to resume; start it again with "
                                           "--overwrite")
        atomic_write_text(self.out_dir / MARKER, self.command + "\n")
        save_config(cfg, self.out_dir / "config.yaml")
        return [k for k in self.order if k in self.rows]

    def _check_config(self, cfg: Any) -> None:
        saved = read_yaml(self.out_dir / "config.yaml")
        saved.pop(PROVENANCE_KEY, None)
        current = yaml.safe_load(yaml.safe_dump(to_dict(cfg), sort_keys=False))
        differ = config_differences(saved, current)
        if differ:
            raise InputError(self.out_dir / "config.yaml", f"the run was started with another config "
                             f"({', '.join(differ[:6])} differ); --resume needs the same config and "
                             "overrides, or choose a new --out")

    def _load(self) -> None:
        path = self.out_dir / "metrics.json"
        if not path.is_file():
            return
        try:
            rows = json.loads(path.read_text())["rows"]
        except (ValueError, KeyError, TypeError) as exc:
            raise InputError(path, f"unreadable ({exc}); start the run again with --overwrite") from exc
        for row in rows:
            key = self.key(row)
            if key in self.order:
                self.rows[key] = row
        for item in self._read_per_image():
            key = tuple(_typed(item[k], type(k0)) for k, k0 in zip(self.layout.keys, next(iter(self.order))))
            if key in self.rows:
                self.per_image.setdefault(key, []).append(item)

    def _read_per_image(self) -> list[dict[str, str]]:
        path = self.out_dir / "per_image.csv"
        if not path.is_file():
            return []
        with open(path, newline="") as fh:
            return list(csv.DictReader(fh))

    def done(self, key: tuple) -> bool:
        return key in self.rows

    def record(self, row: dict[str, Any], per_image: list[dict[str, Any]]) -> None:
        """Add a finished run and rewrite the tables (atomically), runs in plan order."""
        key = self.key(row)
        self.rows[key] = row
        self.per_image[key] = [{**{k: row[k] for k in self.layout.keys}, **r} for r in per_image]
        self.write()

    def ordered_rows(self) -> list[dict[str, Any]]:
        return [self.rows[k] for k in sorted(self.rows, key=self.order.__getitem__)]

    def write(self) -> None:
        write_results(self.out_dir, self.ordered_rows(), self.metrics, self.layout)
        items = [r for k in sorted(self.per_image, key=self.order.__getitem__) for r in self.per_image[k]]
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=list(dict.fromkeys(k for r in items for k in r)))
        writer.writeheader()
        writer.writerows(items)
        atomic_write_text(self.out_dir / "per_image.csv", buf.getvalue())

    def discard(self, path: Path) -> None:
        """Remove what an unfinished run left inside RUN_DIR (its TensorBoard folder, a kept model)."""
        if path.resolve().is_relative_to(self.out_dir.resolve()) and path.exists():
            shutil.rmtree(path)


def _typed(text: str, kind: type) -> Any:
    """A key column read back from per_image.csv as the type of the plan's keys."""
    return kind(text) if kind in (int, float, str) else text


def run_dir_of(out_dir: Path, group: str, shots: int, seed: int) -> Path:
    """Where a kept run lives: RUN_DIR/<init or arm>/shots<k>_seed<s>."""
    return out_dir / str(group) / f"shots{shots}_seed{seed}"


def restore_kept(folder: RunFolder, out_dir: Path, keep: str, val_column: str) -> dict[tuple, dict[str, Any]]:
    """The kept run of each (group, shots) among the finished rows, as an uninterrupted protocol kept it
    (keep=best: the first best-validated seed; keep=all: every run); kept folders of runs that did not
    finish are removed."""
    kept: dict[tuple, dict[str, Any]] = {}
    wanted = set()
    for row in folder.ordered_rows():
        group, shots = row[folder.layout.group], row["shots"]
        target = run_dir_of(out_dir, group, shots, row["seed"])
        previous = kept.get((group, shots))
        if keep == "all" or previous is None or row[val_column] > previous["score"]:
            kept[(group, shots)] = {"score": row[val_column], "dir": target}
        if keep == "all":
            wanted.add(target)
    wanted |= {entry["dir"] for entry in kept.values()}
    for path in out_dir.glob("*/shots*_seed*"):
        if path.is_dir() and path not in wanted and path.parent.name != "tb":
            folder.discard(path)
    return kept


def run_pending(folder: RunFolder, runs: Sequence[Any], run_one: Callable[[Any, StopRequest], Any], desc: str,
                progress: bool, key: Callable[[Any], Hashable] = lambda run: run) -> bool:
    """Run, in plan order, the runs the folder has not finished; `run_one(run, stop)` returns the run's
    (row, per-image scores) to record, or None when a signal interrupted it. True when a signal stopped
    the protocol (before a run or during one)."""
    from lsmfm.progress import progress_bar

    with StopRequest() as stop:
        for run in progress_bar([r for r in runs if not folder.done(key(r))], desc=desc, unit="run",
                                enabled=progress):
            if stop():
                return True
            finished = run_one(run, stop)
            if finished is None:
                return True
            folder.record(*finished)
    return False


def keep_run(kept: dict[tuple, dict[str, Any]], key: tuple, score: float, keep: str, target: Path,
             save: Callable[[Path], None]) -> None:
    """Save a run to `target` if keep=all, or if it is the best-validated run of `key` so far (the one it
    replaces is removed); `kept` as `restore_kept` returns it."""
    previous = kept.get(key)
    if keep == "best" and previous is not None and not score > previous["score"]:
        return
    save(target)
    if keep == "best" and previous is not None:
        shutil.rmtree(previous["dir"], ignore_errors=True)
    kept[key] = {"score": score, "dir": target}
