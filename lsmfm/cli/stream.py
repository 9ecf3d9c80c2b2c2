"""`lsmfm stream --catalog FILE`: stream patches as pretraining would; report what came out, how fast."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from lsmfm.cli.common import add_overwrite, add_quiet, check_output


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--catalog", action="append", required=True, type=Path, metavar="FILE",
                        help="data catalog YAML (repeatable)")
    parser.add_argument("--config", type=Path, default=None, help="stream config YAML (StreamConfig keys)")
    parser.add_argument("--patch", type=int, default=None, help="cubic patch side in voxels (default 96)")
    parser.add_argument("--batch", type=int, default=2, help="batch size (default 2)")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader worker processes (default 2)")
    parser.add_argument("--n", type=int, default=50, help="batches to stream (default 50)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None, help="also write the report as JSON here")
    add_overwrite(parser, "an existing --json file")
    add_quiet(parser)
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="config overrides, e.g. augment.enabled=false")


def run(args: argparse.Namespace) -> int:
    from lsmfm.config import load_config
    from lsmfm.data.stream.config import StreamConfig
    from lsmfm.data.stream.dataset import format_stream_report, stream_report
    from lsmfm.errors import InputError
    from lsmfm.io.atomic import atomic_write_text

    overrides = list(args.overrides)
    if args.patch is not None:
        overrides.append(f"patch_size=[{args.patch}, {args.patch}, {args.patch}]")
    cfg = load_config(StreamConfig, args.config, overrides)
    cfg.catalogs = [str(c) for c in args.catalog]  # set directly: paths need no YAML quoting
    if min(args.batch, args.n) < 1 or args.workers < 0:
        raise InputError(None, f"--batch and --n must be >= 1 and --workers >= 0, got {args.batch}, "
                               f"{args.n}, {args.workers}")
    check_output(args.json, overwrite=args.overwrite, kind="file")
    report = stream_report(cfg, n_batches=args.n, batch_size=args.batch, num_workers=args.workers,
                           seed=args.seed, progress=not args.quiet)
    print(format_stream_report(report))
    if args.json is not None:
        atomic_write_text(args.json, json.dumps(report, indent=2))
    return 0
