"""lsmfm: 3D foundation models for light-sheet fluorescence microscopy, from raw volumes to answers.

Entry point of the `lsmfm` command. Subcommands are listed explicitly in COMMANDS and imported only
when used, so `lsmfm --help` stays fast and a subcommand's heavy dependencies (DeepSpeed,
transformers) load only for that subcommand. Each module defines `add_arguments(parser)` and `run(args) -> int`.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from typing import Sequence

from lsmfm.cli.common import run_command

DESCRIPTION = """\
lsmfm turns terabyte light-sheet microscopy volumes and a handful of annotations into models: ingest
volumes into OME-Zarr, pretrain a 3D foundation model on unlabelled data (student-teacher, masked
reconstruction, optional image-text alignment), finetune it few-shot for segmentation, classification
or deblurring (always against the same network from scratch), compare with 2D foundation-model
baselines, predict whole volumes, and export models for Fiji/deepImageJ, napari and bioimage.io."""

EPILOG = """\
typical workflow: lsmfm ingest -> lsmfm pretrain -> lsmfm export -> lsmfm finetune -> lsmfm predict
                  (which model to use on your volumes: lsmfm compare segment)
                  (or: lsmfm demo, all of it on synthetic data on one CPU)
`lsmfm COMMAND --help` describes each command. Exit status: 0 done; 1 an error in the input, a
config or the environment (one line naming the file and the problem), or a bug (with a traceback);
2 a usage error (unknown option, missing argument); 130 interrupted."""

COMMANDS: dict[str, tuple[str, str]] = {
    "synth": ("lsmfm.cli.synth", "generate synthetic light-sheet-like volumes with ground truth"),
    "ingest": ("lsmfm.cli.ingest", "convert TIFF/NIfTI/Zarr volumes into an OME-Zarr store"),
    "catalog": ("lsmfm.cli.catalog", "validate or import dataset catalogs"),
    "stream": ("lsmfm.cli.stream", "stream patches from catalog sources and report throughput"),
    "pretrain": ("lsmfm.cli.pretrain", "pretrain a 3D foundation model (DeepSpeed)"),
    "export": ("lsmfm.cli.export", "export a pretraining run's weights, or a finetuned model as a "
                                    "bioimage.io package"),
    "finetune": ("lsmfm.cli.finetune", "few-shot finetuning: segment, classify, deblur"),
    "predict": ("lsmfm.cli.predict", "sliding-window prediction over whole volumes"),
    "baseline2d": ("lsmfm.cli.baseline2d", "2D foundation-model PEFT baselines"),
    "compare": ("lsmfm.cli.compare", "pretrained vs scratch vs 2D baselines: one table and one plot"),
    "analyze": ("lsmfm.cli.analyze", "domain analysis of encoder features"),
    "demo": ("lsmfm.cli.demo", "run the embedded default end to end on synthetic data"),
}


class _Version(argparse.Action):
    """`--version`: the version and git commit, looked up only when asked (git runs a subprocess)."""

    def __call__(self, parser: argparse.ArgumentParser, *args: object) -> None:
        from lsmfm.provenance import version_line

        print(version_line())
        parser.exit()


def build_parser(argv: Sequence[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lsmfm", description=DESCRIPTION, epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action=_Version, nargs=0, help="print the version and git commit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    wanted = next((a for a in argv if not a.startswith("-")), None)
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == wanted:
            importlib.import_module(module).add_arguments(p)
    return parser


def parse_with_overrides(parser: argparse.ArgumentParser, argv: Sequence[str]) -> argparse.Namespace:
    """Parse `argv`, accepting `key=value` overrides anywhere (argparse alone rejects them after options)."""
    args, extra = parser.parse_known_args(argv)
    if extra:
        stray = [a for a in extra if a.startswith("-") or "=" not in a]
        if stray or not hasattr(args, "overrides"):
            parser.error(f"unrecognized arguments: {' '.join(stray or extra)}")
        args.overrides = list(args.overrides or []) + extra
    return args


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(argv)
    args = parse_with_overrides(parser, argv)
    if args.command is None:
        parser.print_help()
        return 2
    module = importlib.import_module(COMMANDS[args.command][0])
    return run_command(args.command, module.run, args)


if __name__ == "__main__":
    sys.exit(main())
