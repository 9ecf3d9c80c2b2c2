"""Entry point of the `lsmfm` command.

Subcommands are listed explicitly in COMMANDS and imported only when used, so `lsmfm --help` stays
fast and a subcommand's heavy dependencies (DeepSpeed, transformers) load only for that subcommand.
Each module defines `add_arguments(parser)` and `run(args) -> int`.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from typing import Sequence

from lsmfm.errors import LsmfmError

COMMANDS: dict[str, tuple[str, str]] = {
    "synth": ("lsmfm.cli.synth", "generate synthetic light-sheet-like volumes with ground truth"),
    "ingest": ("lsmfm.cli.ingest", "convert TIFF/NIfTI/Zarr volumes into an OME-Zarr store"),
    "catalog": ("lsmfm.cli.catalog", "validate or import dataset catalogs"),
    "stream": ("lsmfm.cli.stream", "stream patches from catalog sources and report throughput"),
    "pretrain": ("lsmfm.cli.pretrain", "pretrain a 3D foundation model (DeepSpeed)"),
    "export": ("lsmfm.cli.export", "export a training run to safetensors + config.json"),
    "finetune": ("lsmfm.cli.finetune", "few-shot finetuning: segment, classify, deblur"),
    "predict": ("lsmfm.cli.predict", "sliding-window prediction over whole volumes"),
    "baseline2d": ("lsmfm.cli.baseline2d", "2D foundation-model PEFT baselines"),
    "analyze": ("lsmfm.cli.analyze", "domain analysis of encoder features"),
    "demo": ("lsmfm.cli.demo", "run the embedded default end to end on synthetic data"),
}


def build_parser(argv: Sequence[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lsmfm", description=__doc__.splitlines()[0])
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
    try:
        return int(module.run(args) or 0)
    except LsmfmError as exc:
        print(f"lsmfm {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"lsmfm {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
