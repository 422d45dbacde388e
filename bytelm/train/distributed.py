"""The processes and cores a run trains on: torchrun's ranks (DDP), the collectives the loop needs and the CPU
thread count. (How much memory a step may use is bytelm.device.require_memory's question.)

    d = setup_distributed("auto")     # Dist(rank, world_size, local_rank, device); one process without torchrun
    all_reduce_sum(t, d)              # in place across ranks; a no-op for one process
    teardown_distributed(d)

torchrun sets RANK, WORLD_SIZE and LOCAL_RANK; without them this is one process.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from bytelm.device import pick_device
from bytelm.errors import BytelmError


@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    owns_group: bool = False  # we initialised the process group, so we tear it down

    @property
    def main(self) -> bool:
        return self.rank == 0


def _env_int(name: str, default: int, low: int) -> int:
    text = os.environ.get(name, str(default))
    try:
        value = int(text)
    except ValueError:
        value = low - 1
    if value < low:
        raise BytelmError(f"{name}={text!r} in the environment is not a whole number >= {low} (torchrun sets it)")
    return value


def setup_distributed(device_name: str) -> Dist:
    world = _env_int("WORLD_SIZE", 1, 1)
    rank, local = _env_int("RANK", 0, 0), _env_int("LOCAL_RANK", 0, 0)
    if rank >= world:
        raise BytelmError(f"RANK={rank} in the environment is not below WORLD_SIZE={world}")
    device = pick_device(device_name)
    if world == 1:
        return Dist(device=device)
    if device.type == "cuda":
        if device.index is None:
            device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    owns = not dist.is_initialized()
    if owns:
        if device.type == "cuda":
            dist.init_process_group("nccl", device_id=device)
        else:
            dist.init_process_group("gloo")
    return Dist(rank, world, local, device, owns)


def teardown_distributed(d: Dist) -> None:
    if d.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(t: torch.Tensor, d: Dist) -> torch.Tensor:
    if d.world_size > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_reduce_max(t: torch.Tensor, d: Dist) -> torch.Tensor:
    if d.world_size > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t


def auto_threads() -> int:
    """CPU threads for torch: the cores that other processes are not already keeping busy.

    OpenMP threads wait for each other at every parallel region, so a thread sharing its core with another
    busy process stalls all of them. On the 2-core test machine with one other job running, the default
    model's step took 2-14 s with 2 threads and a steady 0.95 s with 1. OMP_NUM_THREADS (torchrun sets it)
    is respected.
    """
    if os.environ.get("OMP_NUM_THREADS"):
        return torch.get_num_threads()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        busy = int(os.getloadavg()[0] + 0.5)
    except (OSError, AttributeError):
        busy = 0
    return max(1, min(torch.get_num_threads(), cores - busy))



def set_threads(n: int, zero_is_automatic: bool = False) -> int:
    """Set torch's CPU threads from a command line's --threads and return the count: 1 to this machine's CPUs
    (a huge count crashed torch's thread pool), or 0 for auto_threads() where the command allows it."""
    cpus = os.cpu_count() or 1
    low = 0 if zero_is_automatic else 1
    if not (isinstance(n, int) and low <= n <= cpus):
        auto = "; 0 picks the free cores" if zero_is_automatic else ""
        raise BytelmError(f"--threads must be between {low} and {cpus} (this machine's CPUs{auto}), got {n}")
    n = n or auto_threads()
    torch.set_num_threads(n)
    return n
