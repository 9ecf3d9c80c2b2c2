"""The comparison's Markdown table: one line per (arm, shots), metrics as mean ± std across seeds, and
what each arm cost (trainable parameters, annotated voxels, training time, peak memory)."""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from lsmfm.tasks.results import Layout, summarize

LAYOUT = Layout(keys=("arm", "kind", "shots", "seed"), group="arm", carry=("kind",))
COST = ("trainable_params", "annotated_voxels", "train_seconds", "peak_memory_mb")


def markdown_table(rows: Sequence[dict[str, Any]], metrics: Sequence[str]) -> str:
    """| arm | kind | shots | seeds | <metric> ... | trainable params | annotated voxels | train s | peak MB |
    (costs: mean across seeds; peak memory: the largest)."""
    head = ["arm", "kind", "shots", "seeds", *metrics, "trainable params", "annotated voxels", "train s",
            "peak MB"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for entry in summarize(rows, metrics, LAYOUT):
        group = [r for r in rows if r["arm"] == entry["arm"] and int(r["shots"]) == entry["shots"]]
        cells = [entry["arm"], entry["kind"], str(entry["shots"]), str(entry["n_seeds"])]
        cells += [f"{entry[m]['mean']:.3f} ± {entry[m]['std']:.3f}" if m in entry else "-" for m in metrics]
        cost = {c: [float(r[c]) for r in group] for c in COST}
        cells += [f"{np.mean(cost['trainable_params']):,.0f}", f"{np.mean(cost['annotated_voxels']):,.0f}",
                  f"{np.mean(cost['train_seconds']):.1f}", f"{max(cost['peak_memory_mb']):.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
