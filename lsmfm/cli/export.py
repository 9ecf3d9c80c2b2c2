"""`lsmfm export`: share a model.

    lsmfm export RUN_DIR --out DIR [--which teacher|student] [--tag TAG]
        a pretraining run's backbone as model.safetensors + config.json + README.md (model card); load
        it with `lsmfm.load_pretrained(DIR)`. DeepSpeed is imported only to merge ZeRO shards.
    lsmfm export --format bioimageio MODEL_DIR --out model.zip [--test-input VOLUME] [--author NAME]
        a finetuned segment or deblur model folder as a bioimage.io package (deepImageJ, ilastik, napari,
        bioimageio.core); needs `pip install 'lsmfm[bioimageio]'`.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from lsmfm.cli.common import add_overwrite, check_output


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", type=Path, metavar="RUN_DIR|MODEL_DIR",
                        help="pretraining run folder (the --out of lsmfm pretrain); with --format bioimageio "
                             "a finetuned model folder (e.g. FINETUNE_OUT/pretrained/shots4_seed0/model)")
    parser.add_argument("--out", type=Path, required=True,
                        help="weights folder to create; with --format bioimageio the .zip package to write")
    parser.add_argument("--format", choices=["lsmfm", "bioimageio"], default="lsmfm",
                        help="lsmfm: a weights folder (default); bioimageio: a bioimage.io model package")
    parser.add_argument("--which", choices=["teacher", "student"], default="teacher",
                        help="network to export; default teacher (the EMA encoder, smoother and better "
                             "downstream)")
    parser.add_argument("--tag", default=None,
                        help="checkpoint tag, or best (the best validation loss); default: the one named by "
                             "checkpoints/latest")
    bio = parser.add_argument_group("bioimage.io packages (--format bioimageio)")
    bio.add_argument("--test-input", type=Path, default=None,
                     help="volume whose centre patch becomes the test input (default: a synthetic volume)")
    bio.add_argument("--author", action="append", default=None,
                     help="who trained the model; repeat for several (default: your login name)")
    bio.add_argument("--name", default=None, help="package name (default: lsmfm TASK NETWORK (light-sheet 3D))")
    bio.add_argument("--license", default="MIT", help="SPDX licence of the weights (default MIT)")
    add_overwrite(parser, "--out")


def run(args: argparse.Namespace) -> int:
    if args.format == "bioimageio":
        return _bioimageio(args)
    from lsmfm.weights.export import export_run

    check_output(args.out, overwrite=args.overwrite, kind="folder")
    out = export_run(args.source, args.out, which=args.which, tag=args.tag, overwrite=args.overwrite)
    print(f"exported the {args.which} backbone of {args.source} to {out}")
    return 0


def _bioimageio(args: argparse.Namespace) -> int:
    from lsmfm.bioimageio.package import PackageOptions, export_bioimageio

    check_output(args.out, overwrite=args.overwrite, kind="file")
    opts = PackageOptions(name=args.name, authors=tuple(args.author or ()), license=args.license,
                          test_input=args.test_input)
    out = export_bioimageio(args.source, args.out, opts, overwrite=args.overwrite)
    print(f"wrote the bioimage.io package of {args.source} to {out}; check it with `bioimageio test {out}`")
    return 0
