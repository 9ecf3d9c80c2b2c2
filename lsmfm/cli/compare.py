"""`lsmfm compare TASK --config finetune/compare_<task>.yaml --out RUN_DIR [--resume] [key=value ...]`: which
model should I use on my volumes? Every arm of the config (3D pretrained sources, scratch, 2D
foundation-model baselines) trained with the same volumes per shot, the same loop and the same metrics;
one table and one plot per metric (see `lsmfm.compare.run` for RUN_DIR).

Exit status 75 after SIGTERM/SIGUSR1: the finished runs are written; `--resume` continues.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from lsmfm.cli.common import add_overwrite, add_quiet, check_writable


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from lsmfm.tasks.registry import TASKS

    sub = parser.add_subparsers(dest="task", metavar="TASK", required=True)
    for name in TASKS:
        arms = "pretrained, scratch" + (", 2D baselines" if name == "segment" else "")
        text = f"compare arms on {name} ({arms})"
        p = sub.add_parser(name, help=text, description=text)
        p.add_argument("--config", type=Path, default=None,
                       help=f"config YAML (e.g. finetune/compare_{name}.yaml)")
        p.add_argument("--out", type=Path, required=True,
                       help="run folder: results.csv, metrics.json, results.md, plots, tb/, kept runs")
        add_overwrite(p, "an earlier comparison in --out")
        p.add_argument("--resume", action="store_true",
                       help="continue the comparison in --out: skip finished runs, re-run the "
                            "interrupted one")
        add_quiet(p)
        p.add_argument("overrides", nargs="*", metavar="key=value",
                       help="dotted config overrides, e.g. shots=[1,2] seeds=[0] train.max_steps=50")


def run(args: argparse.Namespace) -> int:
    from lsmfm.compare.config import compare_config_class
    from lsmfm.compare.report import markdown_table
    from lsmfm.compare.run import command, plan_compare, run_compare
    from lsmfm.config import load_config
    from lsmfm.tasks.protocol import STOPPED, check_run_dir

    check_run_dir(args.out, command(args.task), args.overwrite, args.resume)
    check_writable(args.out if args.out.is_dir() else args.out.parent)
    cfg = load_config(compare_config_class(args.task), args.config, args.overrides)
    plan = plan_compare(args.task, cfg)
    outcome = run_compare(plan, args.out, progress=not args.quiet, overwrite=args.overwrite,
                          resume=args.resume)
    if outcome.rows:
        print(f"\n{args.task}: test-set metrics per arm, mean ± std over seeds ({args.out}/results.csv)")
        print(markdown_table(outcome.rows, plan.task.metrics))
        print(f"plots: {', '.join(str(args.out / f'{m}_vs_shots.png') for m in plan.task.metrics)}")
    if outcome.stopped:
        print(f"stopped by a signal after {len(outcome.rows)} of {len(plan.runs)} runs; they are kept in "
              f"{args.out}: run the same command with --resume to finish")
        return STOPPED
    return 0
