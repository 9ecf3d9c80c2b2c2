"""Where ingest runs its tasks: local threads (default), a `dask.distributed` LocalCluster of worker
processes on this machine (`--workers N`), or an existing cluster (`--dask-address tcp://host:8786`, e.g.
one that `dask-jobqueue`'s SLURMCluster started: see slurm/ingest.sbatch).

Every task reads its region of the source and writes whole shards of the store, so the graph, and the
store, are the same whichever runs it; the workers only need the source and the output on a file system
they all see. Memory per worker is a few shards (`--shard`): `memory_limit` bounds it.
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterator

from lsmfm.errors import ConfigError, InputError


@contextlib.contextmanager
def dask_client(address: str | None = None, workers: int | None = None, memory_limit: str = "auto"
                ) -> Iterator[Any]:
    """The active `distributed.Client` for the block (None for local threads); `lsmfm.data.ingest.
    pyramid.compute` runs every graph on it."""
    if address and workers:
        raise ConfigError("give --dask-address or --workers, not both")
    if not address and not workers:
        yield None
        return
    if workers is not None and workers < 1:
        raise ConfigError(f"--workers must be >= 1, got {workers}")
    from lsmfm.extras import require

    distributed = require("distributed", "cluster", "ingest on a Dask cluster (--workers, --dask-address)")
    Client, LocalCluster = distributed.Client, distributed.LocalCluster
    with contextlib.ExitStack() as stack:
        if address:
            try:
                client = stack.enter_context(Client(address, timeout="30s"))
            except (OSError, TimeoutError) as exc:
                raise InputError(None, f"cannot reach the Dask scheduler at {address}: {exc}") from exc
        else:
            cluster = stack.enter_context(LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                                                       memory_limit=memory_limit, dashboard_address=None))
            client = stack.enter_context(Client(cluster))
        yield client
