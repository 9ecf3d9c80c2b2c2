"""`lsmfm export RUN_DIR --out DIR [--which teacher|student] [--tag TAG]`: a run's weights, ready to share.

Writes model.safetensors + config.json + README.md (model card); load it with
`lsmfm.load_pretrained(DIR)`. DeepSpeed is imported only here, to merge ZeRO shards.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from lsmfm.cli.common import add_overwrite, check_output


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", type=Path, metavar="RUN_DIR",
                        help="pretraining run folder (the --out of lsmfm pretrain)")
    parser.add_argument("--out", type=Path, required=True, help="weights folder to create")
    parser.add_argument("--which", choices=["teacher", "student"], default="teacher",
                        help="network to export; default teacher (the EMA encoder, smoother and better "
                             "downstream)")
    parser.add_argument("--tag", default=None,
                        help="checkpoint tag, or best (the best validation loss); default: the one named by "
                             "checkpoints/latest")
    add_overwrite(parser, "--out")


def run(args: argparse.Namespace) -> int:
    from lsmfm.weights.export import export_run

    check_output(args.out, overwrite=args.overwrite, kind="folder")
    out = export_run(args.run_dir, args.out, which=args.which, tag=args.tag, overwrite=args.overwrite)
    print(f"exported the {args.which} backbone of {args.run_dir} to {out}")
    return 0
