"""The ledger of a prediction in progress: which blocks and pyramid levels of `<out>.partial` are done.

    <out>.partial/.lsmfm-ledger/run.json        what the run is (model files, input, options, plan)
    <out>.partial/.lsmfm-ledger/blocks/<i>.json one per finished block: rank, seconds, NaN/Inf voxels
    <out>.partial/.lsmfm-ledger/levels/<n>.json one per finished pyramid level

A block is recorded only after its data is written, each record atomically (temporary name, rename),
so after a kill -9, a preemption or a node failure the records name exactly the blocks whose data is in
the store. A re-run of the same command resumes from them; a leftover of a different run (another
model, input or option) is discarded. The ledger is removed when the store is committed.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from lsmfm.io.atomic import atomic_write_text

LEDGER = ".lsmfm-ledger"


def fingerprint(model_dir: str | Path, input_path: str | Path, settings: dict[str, Any]) -> dict[str, Any]:
    """What makes two runs the same: the model's files and the input (size and modification time of
    every metadata file, so a re-ingested input or re-trained model does not resume), and `settings`."""
    return {"model": _files(Path(model_dir)), "input": _files(Path(input_path)), **settings}


def _files(path: Path) -> dict[str, Any]:
    path = path.resolve()
    if path.is_file():
        st = path.stat()
        return {"path": str(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    metadata = sorted(p for pattern in ("*", "*/*", "*/*/*") for p in path.glob(pattern)
                      if p.is_file() and (p.suffix in METADATA or p.name in METADATA))
    return {"path": str(path), "files": {str(p.relative_to(path)): [p.stat().st_size, p.stat().st_mtime_ns]
                                         for p in metadata}}


METADATA = (".json", ".safetensors", ".yaml", ".zattrs", ".zarray", ".tif", ".tiff", ".nii", ".gz")


class Ledger:
    """The ledger folder of one `.partial` store."""

    def __init__(self, partial: str | Path) -> None:
        self.root = Path(partial) / LEDGER

    def start(self, run: dict[str, Any]) -> None:
        """Begin a new run (rank 0, in a fresh partial folder)."""
        (self.root / "blocks").mkdir(parents=True, exist_ok=True)
        (self.root / "levels").mkdir(exist_ok=True)
        atomic_write_text(self.root / "run.json", json.dumps(run, indent=1, sort_keys=True) + "\n")

    def matches(self, run: dict[str, Any]) -> bool:
        """True when this ledger belongs to the same run (same fingerprint)."""
        try:
            return json.loads((self.root / "run.json").read_text()) == json.loads(json.dumps(run))
        except (OSError, ValueError):
            return False

    def record_block(self, index: int, entry: dict[str, Any]) -> None:
        atomic_write_text(self.root / "blocks" / f"{index}.json", json.dumps(entry) + "\n")

    def blocks(self) -> dict[int, dict[str, Any]]:
        """Finished blocks: index -> record."""
        done = {}
        for path in (self.root / "blocks").glob("*.json"):
            try:
                done[int(path.stem)] = json.loads(path.read_text())
            except (ValueError, OSError):
                continue  # a record is written atomically; anything else is not ours
        return done

    def record_level(self, level: int) -> None:
        atomic_write_text(self.root / "levels" / f"{level}.json", "{}\n")

    def levels(self) -> set[int]:
        return {int(p.stem) for p in (self.root / "levels").glob("*.json") if p.stem.isdigit()}

    def remove(self) -> None:
        import shutil

        shutil.rmtree(self.root, ignore_errors=True)


def exists(partial: str | Path) -> bool:
    return os.path.isfile(Path(partial) / LEDGER / "run.json")
