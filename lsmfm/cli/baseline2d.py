"""`lsmfm baseline2d`: 2D foundation-model PEFT baselines under the few-shot protocol of `lsmfm finetune`.

lsmfm baseline2d --list
lsmfm baseline2d --config finetune/baseline2d_sam_lora.yaml [key=value ...] --dry-run
lsmfm baseline2d --config finetune/baseline2d_sam_lora.yaml [key=value ...] --out RUN_DIR [--resume]
lsmfm baseline2d --compare RUN_DIR [RUN_DIR ...] [--out table.csv]
"""

from __future__ import annotations

import argparse
import json

from lsmfm.cli.common import add_overwrite, add_quiet, check_output


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML config (see finetune/baseline2d_*.yaml)")
    parser.add_argument(
        "overrides", nargs="*", help="dotted key=value overrides, e.g. peft.rank=16 shots=[1,2]"
    )
    parser.add_argument("--out", help="run folder to create (config.yaml, results.csv, metrics.json, plots)")
    add_overwrite(parser, "an existing run folder (or --compare CSV)")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run in --out: skip finished runs, re-run the interrupted one")
    parser.add_argument("--list", action="store_true", help="list the PEFT methods, models and decoders")
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="build the model and print one JSON line with trainable_params and total_params",
    )
    add_quiet(parser)
    parser.add_argument("--compare", nargs="+", metavar="RUN_DIR",
                        help="one Markdown table across finished runs (with --out: also written as CSV)")


def run(args: argparse.Namespace) -> int:
    from lsmfm.errors import ConfigError

    if args.list:
        print_methods()
        return 0
    if args.compare:
        from lsmfm.baselines2d.compare import compare_runs, to_markdown, write_csv

        check_output(args.out, overwrite=args.overwrite, kind="file")
        table = compare_runs(args.compare)
        print(to_markdown(table))
        if args.out:
            write_csv(table, args.out)
        return 0
    from lsmfm.baselines2d.config import Baseline2DConfig
    from lsmfm.config import load_config

    cfg = load_config(Baseline2DConfig, args.config, args.overrides)
    if args.dry_run:
        from lsmfm.baselines2d.build import build_baseline, count_parameters

        trainable, total = count_parameters(build_baseline(cfg))
        info = {"model": cfg.model.name, "size": cfg.model.size, "weights": cfg.model.weights,
                "decoder": cfg.model.decoder, "method": cfg.peft.method,
                "trainable_params": trainable, "total_params": total}
        print(json.dumps(info))
        return 0
    if not args.out:
        raise ConfigError("--out RUN_DIR is required (or use --dry-run / --list)")
    from lsmfm.baselines2d.evaluate import METRICS
    from lsmfm.baselines2d.train import run_baseline
    from lsmfm.tasks.protocol import STOPPED
    from lsmfm.tasks.results import format_table

    check_output(args.out, overwrite=None, kind="folder")  # run_baseline decides: --overwrite, --resume
    outcome = run_baseline(cfg, args.out, overwrite=args.overwrite, progress=not args.quiet,
                           resume=args.resume)
    if outcome.rows:
        print(format_table(outcome.rows, METRICS))
    if outcome.stopped:
        print(f"stopped by a signal after {len(outcome.rows)} runs; they are kept in {args.out}: run the "
              "same command with --resume to finish")
        return STOPPED
    print(f"results written to {args.out}")
    return 0


def print_methods() -> None:
    from lsmfm.baselines2d.registry import ALL_DECODERS, ALL_MODELS, METHODS

    width = max(len(n) for n in METHODS)
    print("PEFT methods (peft.method):")
    for name, info in METHODS.items():
        where = "" if info.models == ALL_MODELS else f"  [models: {', '.join(info.models)}]"
        print(f"  {name.ljust(width)}  {info.summary}{where}")
    print(f"models (model.name): {', '.join(ALL_MODELS)}; sizes (model.size): tiny, vit_b, vit_l, vit_h")
    print(f"decoders (model.decoder): {', '.join(ALL_DECODERS)}")
