"""One table across baseline runs: each run folder's results.csv summarised per (shots), side by side.

`lsmfm baseline2d --compare RUN_DIR ... [--out table.csv]` prints it as Markdown (for a README) and can
write it as CSV.
"""
from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

import numpy as np

from lsmfm.baselines2d.evaluate import METRICS
from lsmfm.errors import InputError
from lsmfm.io.atomic import atomic_write_text

COLUMNS = ("run", "model", "method", "init", "trainable_params", "shots", "runs", *METRICS, "sec_per_iter",
           "peak_memory_mb")


def read_results(run_dir: str | Path) -> list[dict[str, str]]:
    path = Path(run_dir) / "results.csv"
    if not path.is_file():
        raise InputError(run_dir, "not a baseline2d run folder: results.csv is missing")
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    missing = {"model", "method", "trainable_params", *METRICS} - set(rows[0] if rows else ())
    if missing:
        raise InputError(path, f"no baseline2d results (missing columns: {', '.join(sorted(missing))})")
    return rows


def compare_runs(run_dirs: list[str | Path]) -> list[dict[str, Any]]:
    """One row per (run folder, shots): mean and std over seeds of the metrics, mean time per iteration
    and peak memory."""
    table = []
    for run in run_dirs:
        rows = read_results(run)
        for shots in sorted({int(r["shots"]) for r in rows}):
            group = [r for r in rows if int(r["shots"]) == shots]
            entry: dict[str, Any] = {"run": Path(run).name}
            entry.update({k: group[0][k] for k in ("model", "method", "init")})
            entry.update(trainable_params=int(group[0]["trainable_params"]), shots=shots, runs=len(group))
            for key in (*METRICS, "sec_per_iter", "peak_memory_mb"):
                vals = np.array([float(r[key]) for r in group])
                entry[key] = (float(vals.mean()), float(vals.std()))
            table.append(entry)
    return table


def _cell(key: str, value: Any) -> str:
    if key in METRICS:
        return f"{value[0]:.3f} ± {value[1]:.3f}"
    if key == "sec_per_iter":
        return f"{value[0]:.3f}"
    if key == "peak_memory_mb":
        return f"{value[0]:.0f}"
    if key == "trainable_params":
        return f"{value:,}"
    return str(value)


def to_markdown(table: list[dict[str, Any]]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(_cell(k, row[k]) for k in COLUMNS) + " |" for row in table]
    return "\n".join(lines)


def write_csv(table: list[dict[str, Any]], path: str | Path) -> None:
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(COLUMNS)
    for row in table:
        writer.writerow([row[k][0] if isinstance(row[k], tuple) else row[k] for k in COLUMNS])
    atomic_write_text(path, buf.getvalue())
