"""`lsmfm ingest SRC... --out STORE.zarr`: convert volumes into one OME-Zarr (NGFF 0.5) image."""
from __future__ import annotations

import argparse
from pathlib import Path

from lsmfm.cli.common import add_overwrite, add_quiet, check_output


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("sources", nargs="+", type=Path, metavar="SRC",
                        help="TIFF/OME-TIFF, NIfTI, folder of 2D TIFF planes or Zarr; several are channels")
    parser.add_argument("--out", type=Path, required=True, help="the OME-Zarr image to write (STORE.zarr)")
    parser.add_argument("--label", action="append", default=[], metavar="NAME=PATH",
                        help="a label image stored as labels/NAME (repeatable)")
    parser.add_argument("--chunk", type=int, default=64, help="chunk side in voxels (default 64)")
    parser.add_argument("--shard", type=int, default=4,
                        help="chunks per shard side: one file per shard (default 4: 256³ voxels per file, "
                             "capped at the volume; 1: one file per chunk); each task holds a shard in memory")
    parser.add_argument("--workers", type=int, default=None,
                        help="run on a dask.distributed LocalCluster of N worker processes (default: threads)")
    parser.add_argument("--dask-address", default=None, metavar="ADDRESS",
                        help="run on an existing Dask cluster, e.g. tcp://host:8786 (slurm/ingest.sbatch)")
    parser.add_argument("--levels", type=int, default=None,
                        help="pyramid levels (default: >= 2, until a level fits in one chunk)")
    add_overwrite(parser, "an existing store")
    add_quiet(parser)


def parse_labels(items: list[str]) -> dict[str, Path]:
    """NAME=PATH pairs; names must be unique and usable as folder names."""
    from lsmfm.errors import InputError

    labels: dict[str, Path] = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name or not path or "/" in name or name in labels:
            raise InputError(None, f"--label {item!r}: expected a unique NAME=PATH")
        labels[name] = Path(path)
    return labels


def run(args: argparse.Namespace) -> int:
    from lsmfm.data.ingest.cluster import dask_client
    from lsmfm.data.ingest.convert import ingest
    from lsmfm.io.omezarr import open_image

    check_output(args.out, overwrite=None, kind="store")  # ingest decides about existing stores
    with dask_client(args.dask_address, args.workers):
        out = ingest(args.sources, args.out, labels=parse_labels(args.label), chunk=args.chunk,
                     levels=args.levels, overwrite=args.overwrite, progress=not args.quiet, shard=args.shard)
    group, ms = open_image(out)
    shapes = ", ".join("x".join(map(str, group[p].shape)) for p in ms.paths)
    voxel = "x".join(f"{v:g}" for v in ms.voxel_sizes[0])
    print(f"wrote {out}: levels (c, z, y, x) {shapes}; voxel (z, y, x) {voxel} µm")
    return 0
