"""`lsmfm finetune TASK --config finetune/<task>.yaml [key=value ...] --out RUN_DIR`, one subcommand per
registered task (`lsmfm.tasks.registry`: segment, classify, deblur).

Runs the few-shot protocol (shots x seeds x pretrained/scratch) and prints the summary table; see
`lsmfm.tasks.fewshot` for what RUN_DIR holds. Inputs are checked before RUN_DIR is created. `--resume`
continues an interrupted protocol; after SIGTERM/SIGUSR1 the exit status is 75.
"""
from __future__ import annotations

import argparse

from lsmfm.cli.common import add_protocol_arguments, check_writable, report_protocol


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from lsmfm.tasks.registry import TASKS, task_class

    sub = parser.add_subparsers(dest="task", metavar="TASK", required=True)
    for name in TASKS:
        help_text = task_class(name).summary
        p = sub.add_parser(name, help=help_text, description=help_text)
        add_protocol_arguments(
            p, config_example=f"finetune/{name}.yaml",
            out_help="run folder (new or empty, unless --resume): results.csv, metrics.json, plots, tb/",
            what="an earlier finetune run in --out",
            resume_help="continue the run in --out: skip finished runs, re-run the interrupted one",
            overrides_example="shots=[1,2] train.max_steps=50 init=scratch")


def run(args: argparse.Namespace) -> int:
    from lsmfm.config import load_config
    from lsmfm.tasks.registry import finetune_config_class
    from lsmfm.tasks.fewshot import command, plan_fewshot, run_fewshot
    from lsmfm.tasks.protocol import check_run_dir
    from lsmfm.tasks.results import format_table

    check_run_dir(args.out, command(args.task), args.overwrite, args.resume)
    check_writable(args.out if args.out.is_dir() else args.out.parent)
    cfg = load_config(finetune_config_class(args.task), args.config, args.overrides)
    plan = plan_fewshot(args.task, cfg)
    outcome = run_fewshot(plan, args.out, progress=not args.quiet, overwrite=args.overwrite,
                          resume=args.resume)
    return report_protocol(f"{args.task}: test-set metrics, mean ± std over seeds", args.out, outcome.rows,
                           len(plan.runs), format_table, plan.task.metrics, outcome.stopped)
