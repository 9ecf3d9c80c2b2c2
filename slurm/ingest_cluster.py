"""Ingest a volume on a SLURM cluster: dask-jobqueue's SLURMCluster starts Dask workers as SLURM jobs,
and `lsmfm ingest --dask-address` runs every task on them (the same store as one machine writes).

    python slurm/ingest_cluster.py --jobs 8 --cores 16 --memory 64GB -- brain.tif --out brain.zarr

Run it where jobs can be submitted (a login node, or the small job of slurm/ingest.sbatch): this
process holds the Dask scheduler; the workers need the source and the output on a shared file system.
Each worker job runs `--cores` single-threaded Dask workers (processes) sharing `--memory`; a task holds
about one shard (`lsmfm ingest --shard`: 4³ chunks of 64³ voxels, 32 MiB of uint16, by default).
Needs `pip install dask-jobqueue`.
"""
from __future__ import annotations

import argparse
import sys
from typing import Any, Sequence


def make_cluster(args: argparse.Namespace) -> Any:
    """The SLURMCluster: one job per `--cores` workers, none started until `scale`."""
    from dask_jobqueue import SLURMCluster

    return SLURMCluster(cores=args.cores, processes=args.cores, memory=args.memory, walltime=args.walltime,
                        queue=args.partition, account=args.account, job_name="lsmfm-ingest-worker",
                        log_directory=args.logs, job_extra_directives=args.extra)


def parse(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=4, help="SLURM worker jobs (default 4)")
    parser.add_argument("--cores", type=int, default=16, help="cores (= Dask workers) per job (default 16)")
    parser.add_argument("--memory", default="64GB", help="memory per job (default 64GB)")
    parser.add_argument("--walltime", default="04:00:00")
    parser.add_argument("--partition", default=None)
    parser.add_argument("--account", default=None)
    parser.add_argument("--logs", default="dask-logs", help="folder for the worker jobs' logs")
    parser.add_argument("--extra", action="append", default=[], metavar="DIRECTIVE",
                        help="extra #SBATCH directive for worker jobs, e.g. --extra=--constraint=cpu")
    ours, _, ingest_args = _split(argv)
    return parser.parse_args(ours), ingest_args


def _split(argv: Sequence[str]) -> tuple[list[str], str, list[str]]:
    argv = list(argv)
    if "--" not in argv:
        raise SystemExit("usage: python slurm/ingest_cluster.py [cluster options] -- SRC... --out STORE [...]")
    i = argv.index("--")
    return argv[:i], "--", argv[i + 1:]


def main(argv: Sequence[str] | None = None) -> int:
    from lsmfm.cli.main import main as lsmfm

    args, ingest_args = parse(sys.argv[1:] if argv is None else argv)
    with make_cluster(args) as cluster:
        cluster.scale(jobs=args.jobs)
        return lsmfm(["ingest", *ingest_args, "--dask-address", cluster.scheduler_address])


if __name__ == "__main__":
    sys.exit(main())
