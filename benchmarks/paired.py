"""Paired few-shot table: every arm against a reference arm on the same (shots, seed) runs.

    .venv/bin/python benchmarks/paired.py RUN_DIR [RUN_DIR ...] [--reference scratch] [--json out.json]

lsmfm's own tables (`lsmfm finetune`, `lsmfm compare`) give each arm's mean ± std over seeds. With 3 seeds
that spread is mostly which volumes the seed drew, shared by every arm of a (shots, seed) pair, so the
README's "Evidence on real data" also reports the paired difference (arm − reference on the same runs)
and in how many seeds the arm is better. Reads the results.csv of each RUN_DIR (a finetune run's `init`
column or a comparison's `arm` column); std with ddof 0, as lsmfm's tables.
"""
from __future__ import annotations

import argparse
import csv
import json
import statistics
from collections import defaultdict
from pathlib import Path

METRICS = ("dice", "cldice", "iou")
Runs = dict[tuple[int, int], dict[str, dict[str, float]]]


def read_runs(run_dirs: list[Path]) -> Runs:
    """{(shots, seed): {arm: {metric: value}}} from the results.csv of each run folder."""
    runs: Runs = defaultdict(dict)
    for folder in run_dirs:
        with open(folder / "results.csv", newline="") as f:
            for row in csv.DictReader(f):
                arm = row.get("arm") or row["init"]
                runs[(int(row["shots"]), int(row["seed"]))][arm] = {m: float(row[m]) for m in METRICS}
    return runs


def mean_std(values: list[float]) -> dict[str, float]:
    """Mean and population std (ddof 0) of one metric over seeds."""
    return {"mean": statistics.fmean(values), "std": statistics.pstdev(values)}


def paired(runs: Runs, reference: str) -> list[dict]:
    """One row per (shots, metric, arm): the arm's and the reference's mean ± std over the seeds both ran,
    the paired difference and the number of seeds where the arm is better."""
    arms = sorted({a for r in runs.values() for a in r} - {reference})
    rows = []
    for shots in sorted({k for k, _ in runs}):
        for metric in METRICS:
            for arm in arms:
                pairs = [r for (k, _), r in sorted(runs.items()) if k == shots and {arm, reference} <= set(r)]
                if not pairs:
                    continue
                a = [r[arm][metric] for r in pairs]
                b = [r[reference][metric] for r in pairs]
                diff = [x - y for x, y in zip(a, b)]
                rows.append({"shots": shots, "metric": metric, "arm": arm, "arm_score": mean_std(a),
                             "reference_score": mean_std(b), "difference": mean_std(diff),
                             "better": sum(d > 0 for d in diff), "seeds": len(diff)})
    return rows


def markdown(rows: list[dict], reference: str) -> str:
    """The rows as the README's Markdown table."""
    def fmt(s: dict[str, float], sign: str = "") -> str:
        return f"{s['mean']:{sign}.3f} ± {s['std']:.3f}".replace("-", "−")

    lines = [f"| shots | metric | arm | arm score | {reference} | paired difference | seeds where better |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['shots']} | {r['metric']} | {r['arm']} | {fmt(r['arm_score'])} | "
              f"{fmt(r['reference_score'])} | {fmt(r['difference'], '+')} | {r['better']}/{r['seeds']} |"
              for r in rows]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dirs", nargs="+", type=Path)
    parser.add_argument("--reference", default="scratch", help="the arm (or init) every other is paired with")
    parser.add_argument("--json", type=Path, help="also write the rows as JSON here")
    args = parser.parse_args()
    for folder in args.run_dirs:
        if not (folder / "results.csv").is_file():
            raise SystemExit(f"{folder}: no results.csv (a `lsmfm finetune` or `lsmfm compare` run folder)")
    rows = paired(read_runs(args.run_dirs), args.reference)
    if not rows:
        raise SystemExit(f"no (shots, seed) run has both {args.reference!r} and another arm")
    print(markdown(rows, args.reference))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
