"""The processes a run trains on: torchrun's ranks (DDP) and the collectives the loop needs. (The CPU thread
count is bytelm.device.set_threads; how much memory a step may use is bytelm.device.require_memory's question.)

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


