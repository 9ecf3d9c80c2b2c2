"""`lsmfm finetune TASK --config finetune/<task>.yaml [key=value ...] --out RUN_DIR`, one subcommand per
registered task (`lsmfm.tasks.registry`: segment, classify, deblur).

Runs the few-shot protocol (shots x seeds x pretrained/scratch) and prints the summary table; see
`lsmfm.tasks.fewshot` for what RUN_DIR holds. Inputs are checked before RUN_DIR is created. `--resume`
continues an interrupted protocol; after SIGTERM/SIGUSR1 the exit status is 75.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from lsmfm.cli.common import add_overwrite, add_quiet, check_writable


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from lsmfm.tasks.registry import TASKS, task_class

    sub = parser.add_subparsers(dest="task", metavar="TASK", required=True)
    for name in TASKS:
        help_text = task_class(name).summary
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("--config", type=Path, default=None, help=f"config YAML (e.g. finetune/{name}.yaml)")
        p.add_argument("--out", type=Path, required=True,
                       help="run folder (new or empty, unless --resume): results.csv, metrics.json, "
                            "plots, tb/")
        add_overwrite(p, "an earlier finetune run in --out")
        p.add_argument("--resume", action="store_true",
                       help="continue the run in --out: skip finished runs, re-run the interrupted one")
        add_quiet(p)
        p.add_argument("overrides", nargs="*", metavar="key=value",
                       help="dotted config overrides, e.g. shots=[1,2] train.max_steps=50 init=scratch")


def run(args: argparse.Namespace) -> int:
    from lsmfm.config import load_config
    from lsmfm.tasks.registry import finetune_config_class
    from lsmfm.tasks.fewshot import command, plan_fewshot, run_fewshot
    from lsmfm.tasks.protocol import STOPPED, check_run_dir
    from lsmfm.tasks.results import format_table

    check_run_dir(args.out, command(args.task), args.overwrite, args.resume)
    check_writable(args.out if args.out.is_dir() else args.out.parent)
    cfg = load_config(finetune_config_class(args.task), args.config, args.overrides)
    plan = plan_fewshot(args.task, cfg)
    outcome = run_fewshot(plan, args.out, progress=not args.quiet, overwrite=args.overwrite,
                          resume=args.resume)
    if outcome.rows:
        print(f"\n{args.task}: test-set metrics, mean ± std over seeds ({args.out}/results.csv)")
        print(format_table(outcome.rows, plan.task.metrics))
        print(f"plots: {', '.join(str(args.out / f'{m}_vs_shots.png') for m in plan.task.metrics)}")
    if outcome.stopped:
        print(f"stopped by a signal after {len(outcome.rows)} of {len(plan.runs)} runs; they are kept in "
              f"{args.out}: run the same command with --resume to finish")
        return STOPPED
    return 0
