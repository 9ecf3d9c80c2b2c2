"""The few-shot protocol's bookkeeping, shared by `lsmfm finetune`, `lsmfm baseline2d`
and `lsmfm compare`.

Training subsets are drawn from a seed alone, so a (shots, seed) pair picks the same patches for the
pretrained and the scratch model (every arm of `lsmfm compare`) and across runs. Results go to one CSV
row per run (`Layout.keys`: shots, seed, init for finetune), `metrics.json`, and one PNG per metric:
mean across seeds versus shots with the min-max spread and every run as a dot.
"""
from __future__ import annotations

import csv
import io
import json
from collections import defaultdict
from dataclasses import dataclass
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


@dataclass(frozen=True)
class Layout:
    """How a protocol's rows are keyed and grouped: `keys` lead results.csv (in order) and name a run;
    rows are summarised per (`group`, shots) across seeds; `carry` columns are constant within a group
    and copied into its summary (`lsmfm compare`: the arm's kind)."""

    keys: tuple[str, ...] = KEY_COLUMNS
    group: str = "init"
    carry: tuple[str, ...] = ()


FINETUNE = Layout()


def write_results(run_dir: str | Path, rows: Sequence[dict[str, Any]], metrics: Sequence[str],
                  layout: Layout = FINETUNE) -> None:
    """Write results.csv (one row per run) and metrics.json (rows plus per-setting summary)."""
    run_dir = Path(run_dir)
    extra = [k for k in rows[0] if k not in layout.keys and k not in metrics] if rows else []
    columns = list(layout.keys) + list(metrics) + extra
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow(row)
    atomic_write_text(run_dir / "results.csv", buf.getvalue())
    summary = summarize(rows, metrics, layout)
    atomic_write_text(run_dir / "metrics.json",
                      json.dumps({"rows": list(rows), "summary": summary}, indent=2))


def summarize(rows: Sequence[dict[str, Any]], metrics: Sequence[str], layout: Layout = FINETUNE
              ) -> list[dict[str, Any]]:
    """Mean, std, min and max across seeds for each (group, shots) and metric, groups in order of
    first appearance."""
    groups: dict[tuple[str, int], list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        groups[(str(row[layout.group]), int(row["shots"]))].append(row)
    order = list(dict.fromkeys(str(r[layout.group]) for r in rows))
    out = []
    for (name, shots), group in sorted(groups.items(), key=lambda kv: (order.index(kv[0][0]), kv[0][1])):
        entry: dict[str, Any] = {layout.group: name, **{c: group[0][c] for c in layout.carry},
                                 "shots": shots, "n_seeds": len(group)}
        for m in metrics:
            vals = np.array([float(r[m]) for r in group if r.get(m) is not None], dtype=float)
            if len(vals):
                entry[m] = {"mean": float(vals.mean()), "std": float(vals.std()),
                            "min": float(vals.min()), "max": float(vals.max())}
        out.append(entry)
    return out


def format_table(rows: Sequence[dict[str, Any]], metrics: Sequence[str], layout: Layout = FINETUNE) -> str:
    """A plain-text table of mean ± std across seeds per (group, shots), for printing."""
    summary = summarize(rows, metrics, layout)
    head = [layout.group, *layout.carry, "shots", "seeds"] + list(metrics)
    lines = [head]
    for e in summary:
        cells = [e[layout.group], *(str(e[c]) for c in layout.carry), str(e["shots"]), str(e["n_seeds"])]
        cells += [f"{e[m]['mean']:.3f} ± {e[m]['std']:.3f}" if m in e else "-" for m in metrics]
        lines.append(cells)
    widths = [max(len(r[i]) for r in lines) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in lines)


def plot_metrics(run_dir: str | Path, rows: Sequence[dict[str, Any]], metrics: Sequence[str],
                 title: str = "", layout: Layout = FINETUNE, dashed: Sequence[str] = ()) -> list[Path]:
    """One PNG per metric: the mean across seeds versus shots per group (a line; groups in `dashed`
    dashed), the min-max spread across seeds shaded, and every seed's run as a dot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = summarize(rows, metrics, layout)
    written = []
    for m in metrics:
        fig, ax = plt.subplots(figsize=(5.5, 3.8), dpi=120)
        for name in dict.fromkeys(e[layout.group] for e in summary):
            pts = sorted((e["shots"], e[m]) for e in summary if e[layout.group] == name and m in e)
            if not pts:
                continue
            x = [p[0] for p in pts]
            label = f"{name} (2D)" if name in dashed else name
            line, = ax.plot(x, [p[1]["mean"] for p in pts], marker="o", label=label,
                            linestyle="--" if name in dashed else "-")
            ax.fill_between(x, [p[1]["min"] for p in pts], [p[1]["max"] for p in pts], alpha=0.2,
                            color=line.get_color())
            runs = [(int(r["shots"]), float(r[m])) for r in rows
                    if str(r[layout.group]) == name and r.get(m) is not None]
            ax.scatter([r[0] for r in runs], [r[1] for r in runs], s=9, alpha=0.6, color=line.get_color())
        ax.set_xscale("log", base=2)
        shots = sorted({e["shots"] for e in summary})
        ax.set_xticks(shots, [str(k) for k in shots])
        ax.minorticks_off()
        ax.set_xlabel("training volumes (shots)")
        ax.set_ylabel(m)
        ax.set_title(title or m, fontsize="medium")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
        fig.tight_layout()
        target = Path(run_dir) / f"{m}_vs_shots.png"
        with atomic_path(target) as tmp:
            fig.savefig(tmp, format="png")
        plt.close(fig)
        written.append(target)
    return written
