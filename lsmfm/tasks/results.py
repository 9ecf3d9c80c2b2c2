"""The few-shot protocol's bookkeeping, shared by `lsmfm finetune` and `lsmfm baseline2d`.

Training subsets are drawn from a seed alone, so a (shots, seed) pair picks the same patches for the
pretrained and the scratch model and across runs. Results go to one CSV row per (shots, seed, init),
`metrics.json`, and one PNG per metric: mean across seeds versus shots with the min-max spread.
"""
from __future__ import annotations

import csv
import io
import json
from collections import defaultdict
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from lsmfm.errors import InputError
from lsmfm.io.atomic import atomic_path, atomic_write_text

KEY_COLUMNS = ("shots", "seed", "init")


def fewshot_subset(n_items: int, shots: int, seed: int, source: str = "training set") -> list[int]:
    """Indices of `shots` training items chosen by `seed`; the k-shot subset is a prefix of the (k+1)-shot one."""
    if shots < 1:
        raise InputError(source, f"shots must be >= 1, got {shots}")
    if shots > n_items:
        raise InputError(source, f"{shots} shots requested but only {n_items} training patches available")
    order = np.random.default_rng(seed).permutation(n_items)
    return sorted(int(i) for i in order[:shots])


def write_results(run_dir: str | Path, rows: Sequence[dict[str, Any]], metrics: Sequence[str]) -> None:
    """Write results.csv (one row per shots/seed/init) and metrics.json (rows plus per-setting summary)."""
    run_dir = Path(run_dir)
    extra = [k for k in rows[0] if k not in KEY_COLUMNS and k not in metrics] if rows else []
    columns = list(KEY_COLUMNS) + list(metrics) + extra
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow(row)
    atomic_write_text(run_dir / "results.csv", buf.getvalue())
    summary = summarize(rows, metrics)
    atomic_write_text(run_dir / "metrics.json", json.dumps({"rows": list(rows), "summary": summary}, indent=2))


def summarize(rows: Sequence[dict[str, Any]], metrics: Sequence[str]) -> list[dict[str, Any]]:
    """Mean, std, min and max across seeds for each (init, shots) and metric."""
    groups: dict[tuple[str, int], list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        groups[(str(row["init"]), int(row["shots"]))].append(row)
    out = []
    for (init, shots), group in sorted(groups.items()):
        entry: dict[str, Any] = {"init": init, "shots": shots, "n_seeds": len(group)}
        for m in metrics:
            vals = np.array([float(r[m]) for r in group if r.get(m) is not None], dtype=float)
            if len(vals):
                entry[m] = {"mean": float(vals.mean()), "std": float(vals.std()),
                            "min": float(vals.min()), "max": float(vals.max())}
        out.append(entry)
    return out


def format_table(rows: Sequence[dict[str, Any]], metrics: Sequence[str]) -> str:
    """A plain-text table of mean ± std across seeds per (init, shots), for printing."""
    summary = summarize(rows, metrics)
    head = ["init", "shots", "seeds"] + list(metrics)
    lines = [head]
    for e in summary:
        cells = [e["init"], str(e["shots"]), str(e["n_seeds"])]
        cells += [f"{e[m]['mean']:.3f} ± {e[m]['std']:.3f}" if m in e else "-" for m in metrics]
        lines.append(cells)
    widths = [max(len(r[i]) for r in lines) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in lines)


def plot_metrics(run_dir: str | Path, rows: Sequence[dict[str, Any]], metrics: Sequence[str],
                 title: str = "") -> list[Path]:
    """One PNG per metric: mean across seeds versus shots per init, shaded min-max spread."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = summarize(rows, metrics)
    written = []
    for m in metrics:
        fig, ax = plt.subplots(figsize=(5, 3.6), dpi=120)
        for init in sorted({e["init"] for e in summary}):
            pts = sorted((e["shots"], e[m]) for e in summary if e["init"] == init and m in e)
            if not pts:
                continue
            x = [p[0] for p in pts]
            ax.plot(x, [p[1]["mean"] for p in pts], marker="o", label=init)
            ax.fill_between(x, [p[1]["min"] for p in pts], [p[1]["max"] for p in pts], alpha=0.2)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("training shots")
        ax.set_ylabel(m)
        ax.set_title(title or m)
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        target = Path(run_dir) / f"{m}_vs_shots.png"
        with atomic_path(target) as tmp:
            fig.savefig(tmp, format="png")
        plt.close(fig)
        written.append(target)
    return written
