"""`lsmfm pretrain --config pretrain/<recipe>.yaml --out RUN_DIR [key=value ...] [--resume]`.

Runs as one CPU process by default; under `torchrun` or `srun` every rank runs this same command.
With `--resume` and no `--config`, the run's own RUN_DIR/config.yaml is used.
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, default=None,
                        help="recipe YAML (pretrain/tiny.yaml, pretrain/unet_image_text.yaml, ...)")
    parser.add_argument("--out", type=Path, required=True,
                        help="run folder: config, checkpoints, tb/, metrics")
    parser.add_argument("--resume", action="store_true",
                        help="continue from RUN_DIR's latest checkpoint (starts fresh when it has none)")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="dotted config overrides, e.g. train.max_steps=20 model.use_text=false")


def run(args: argparse.Namespace) -> int:
    from lsmfm.training.pretrain import pretrain, resolve_config

    cfg = resolve_config(args.config, args.overrides, args.out, args.resume)
    metrics = pretrain(cfg, args.out, resume=args.resume)
    if os.environ.get("RANK", "0") == "0":
        print(json.dumps(metrics, indent=2))
    return 0
