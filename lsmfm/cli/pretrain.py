"""`lsmfm pretrain --config pretrain/<recipe>.yaml --out RUN_DIR [key=value ...] [--resume]`.

Runs as one CPU process by default; under `torchrun` or `srun` every rank runs this same command.
With `--resume` and no `--config`, the run's own RUN_DIR/config.yaml is used.
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from lsmfm.cli.common import add_overwrite, add_quiet, check_output


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, default=None,
                        help="recipe YAML (pretrain/tiny.yaml, pretrain/unet_image_text.yaml, ...)")
    parser.add_argument("--out", type=Path, required=True,
                        help="run folder: config, checkpoints, tb/, metrics")
    again = parser.add_mutually_exclusive_group()
    again.add_argument("--resume", action="store_true",
                       help="continue from RUN_DIR's latest checkpoint (starts fresh when it has none)")
    add_overwrite(again, "an earlier pretraining run in --out (start over)")
    add_quiet(parser)
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="dotted config overrides, e.g. train.max_steps=20 model.use_text=false")


def run(args: argparse.Namespace) -> int:
    from lsmfm.errors import InputError
    from lsmfm.extras import require
    from lsmfm.training.pretrain import pretrain, resolve_config

    require("deepspeed", "train", "pretraining")  # before any output exists
    if not (args.resume or args.overwrite) and (args.out / "config.yaml").is_file():
        raise InputError(args.out, "holds an earlier pretraining run; pass --resume to continue it, "
                                   "--overwrite to start over, or choose a new --out")
    check_output(args.out, overwrite=None if args.resume else args.overwrite, kind="folder")
    cfg = resolve_config(args.config, args.overrides, args.out, args.resume)
    metrics = pretrain(cfg, args.out, resume=args.resume, overwrite=args.overwrite, progress=not args.quiet)
    if os.environ.get("RANK", "0") == "0":
        print(json.dumps(metrics, indent=2))
    return 0
