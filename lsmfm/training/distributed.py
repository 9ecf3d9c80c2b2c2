"""Process-group setup shared by every launch: one CPU process with no launcher, torchrun, or srun.

A plain `lsmfm pretrain` gets the env defaults of a one-rank group (RANK=0, WORLD_SIZE=1, LOCAL_RANK=0,
and an in-process store instead of a TCP port, so runs started together never race for one), so the
same DeepSpeed code path runs on a laptop and on 64 GPUs.
Under `srun` without torchrun, SLURM's task variables give the ranks. Gloo on CPU, NCCL on GPU.
"""
from __future__ import annotations

import os
import random
import socket
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

PORT_FLOOR = 20000  # free_port draws from [PORT_FLOOR, the ephemeral range)


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits in the job."""

    rank: int
    world_size: int
    local_rank: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def free_port() -> int:
    """An unused loopback TCP port, drawn at random below the kernel's ephemeral range.

    A port from `bind(0)` comes from the ephemeral range, which every other `bind(0)` and outgoing
    connection on the machine draws from too, so once released it can be taken before the process
    group binds it (EADDRINUSE when runs start together). A random port below that range is only taken
    by another explicit choice.
    """
    low = _ephemeral_low()
    rng = random.SystemRandom()
    for _ in range(64):
        port = rng.randrange(PORT_FLOOR, low) if low > PORT_FLOOR + 1 else 0
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return int(s.getsockname()[1])
    raise RuntimeError("no free TCP port found on 127.0.0.1")


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default lower bound


def ensure_env() -> DistEnv:
    """Fill in the variables torch.distributed reads, from SLURM when present, else one-rank defaults."""
    slurm = {"RANK": "SLURM_PROCID", "WORLD_SIZE": "SLURM_NTASKS", "LOCAL_RANK": "SLURM_LOCALID"}
    if "RANK" not in os.environ and all(v in os.environ for v in slurm.values()):
        for key, var in slurm.items():
            os.environ[key] = os.environ[var]
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in os.environ and os.environ["WORLD_SIZE"] != "1":
        os.environ["MASTER_PORT"] = str(free_port())
    return DistEnv(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"]))


def init(device: torch.device) -> DistEnv:
    """Join (or create) the default process group: NCCL for CUDA devices, gloo otherwise."""
    env = ensure_env()
    if device.type == "cuda":
        torch.cuda.set_device(env.local_rank)
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if env.world_size == 1 and "MASTER_PORT" not in os.environ:  # one process: no port to collide on
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
        else:
            dist.init_process_group(backend, rank=env.rank, world_size=env.world_size)
    return env


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank if `flag` is true on at least one (so all ranks stop at the same step)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return flag
    t = torch.tensor([int(flag)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's `obj`, in rank order (one-element list without a process group)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def shutdown() -> None:
    """Leave the process group so a later run in the same process (tests) starts clean.

    Through DeepSpeed when it wrapped the group: it also drops the subgroups it cached (a clone of the
    world group), which would otherwise outlive the group they belong to.
    """
    if not dist.is_initialized():
        return
    ds_comm = sys.modules.get("deepspeed.comm.comm")
    if ds_comm is not None and getattr(ds_comm, "cdb", None) is not None:
        ds_comm.destroy_process_group()
    else:
        dist.destroy_process_group()
