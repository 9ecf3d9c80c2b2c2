"""Run a function on N gloo ranks of CPU processes and collect what each returns (for tests of code that
talks across ranks)."""
from __future__ import annotations

import os
from typing import Any, Callable

import torch.distributed as dist
import torch.multiprocessing as mp

from lsmfm.training.distributed import free_port


def _rank(rank: int, world: int, port: int, body: Callable[[int], Any], results: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        results[rank] = body(rank)
    finally:
        dist.destroy_process_group()


def run_on_ranks(body: Callable[[int], Any], world: int) -> dict[int, Any]:
    """`body(rank)` on `world` processes joined in one gloo group; {rank: its result}. `body` must be a
    module-level function (it is pickled to the processes)."""
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_rank, args=(world, free_port(), body, results), nprocs=world, join=True)
        return dict(results)
