"""`lsmfm synth`: write the embedded default data (synthetic volumes, their masks, finetuning patches)."""
from __future__ import annotations

import argparse
from pathlib import Path

from lsmfm.cli.common import add_overwrite, add_quiet, check_output


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, required=True, help="folder for volumes/, labels/, finetune/")
    parser.add_argument("--size", type=int, default=128, help="side of each cubic volume (default 128)")
    parser.add_argument("--seed", type=int, default=0, help="everything is a function of this seed")
    parser.add_argument("--volumes", type=int, default=3, help="volumes, cycling nuclei/vessels/plaques")
    parser.add_argument("--patch", type=int, default=64, help="side of the finetuning patches (default 64)")
    parser.add_argument("--per-class", type=int, nargs=3, default=[4, 2, 2], metavar=("TRAIN", "VAL", "TEST"),
                        help="finetuning patches per structure in train/val/test (default 4 2 2)")
    add_overwrite(parser, "a non-empty --out")
    add_quiet(parser)


def run(args: argparse.Namespace) -> int:
    from lsmfm.data.synthetic.write import write_synth_dataset
    from lsmfm.errors import InputError

    if args.size < 16 or args.patch < 16 or args.volumes < 1 or min(args.per_class) < 0:
        raise InputError(None, "--size and --patch must be >= 16, --volumes >= 1, --per-class counts >= 0")
    check_output(args.out, overwrite=args.overwrite, kind="folder")
    counts = dict(zip(("train", "val", "test"), args.per_class))
    out = write_synth_dataset(args.out, args.size, args.seed, args.volumes, args.patch, counts,
                              progress=not args.quiet)
    n_vol = len(list((out / "volumes").glob("*.tif")))
    n_patch = len(list((out / "finetune").glob("*/*_label.nii.gz")))
    print(f"wrote {n_vol} volume(s) of {args.size}³ to {out / 'volumes'}, their masks to {out / 'labels'}, "
          f"{n_patch} finetuning patch(es) of {args.patch}³ to {out / 'finetune'}")
    return 0
