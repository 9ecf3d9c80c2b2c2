"""`lsmfm compare TASK --config finetune/compare_<task>.yaml --out RUN_DIR [--resume] [key=value ...]`: which
model should I use on my volumes? Every arm of the config (3D pretrained sources, scratch, 2D
foundation-model baselines) trained with the same volumes per shot, the same loop and the same metrics;
one table and one plot per metric (see `lsmfm.compare.run` for RUN_DIR).

Exit status 75 after SIGTERM/SIGUSR1: the finished runs are written; `--resume` continues.
"""
from __future__ import annotations

import argparse

from lsmfm.cli.common import add_protocol_arguments, check_writable, report_protocol


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from lsmfm.tasks.registry import TASKS

    sub = parser.add_subparsers(dest="task", metavar="TASK", required=True)
    for name in TASKS:
        arms = "pretrained, scratch" + (", 2D baselines" if name == "segment" else "")
        text = f"compare arms on {name} ({arms})"
        p = sub.add_parser(name, help=text, description=text)
        add_protocol_arguments(
            p, config_example=f"finetune/compare_{name}.yaml",
            out_help="run folder: results.csv, metrics.json, results.md, plots, tb/, kept runs",
            what="an earlier comparison in --out",
            resume_help="continue the comparison in --out: skip finished runs, re-run the interrupted one",
            overrides_example="shots=[1,2] seeds=[0] train.max_steps=50")


def run(args: argparse.Namespace) -> int:
    from lsmfm.compare.config import compare_config_class
    from lsmfm.compare.report import markdown_table
    from lsmfm.compare.run import command, plan_compare, run_compare
    from lsmfm.config import load_config
    from lsmfm.tasks.protocol import check_run_dir

    check_run_dir(args.out, command(args.task), args.overwrite, args.resume)
    check_writable(args.out if args.out.is_dir() else args.out.parent)
    cfg = load_config(compare_config_class(args.task), args.config, args.overrides)
    plan = plan_compare(args.task, cfg)
    outcome = run_compare(plan, args.out, progress=not args.quiet, overwrite=args.overwrite,
                          resume=args.resume)
    return report_protocol(f"{args.task}: test-set metrics per arm, mean ± std over seeds", args.out,
                           outcome.rows, len(plan.runs), markdown_table, plan.task.metrics, outcome.stopped)
