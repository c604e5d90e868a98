"""Process group setup: the same code under torchrun, SLURM (later) or a plain `python`."""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(timeout_s: float = 600.0) -> DistEnv:
    """Join the process group torchrun describes, or make a world of one.

    CUDA gets NCCL for tensors on the GPU and gloo for CPU-side objects; CPU gets gloo.
    A single process uses an in-memory store, so `python train.py` needs no port.
    """
    use_cuda = torch.cuda.is_available()
    backend = "cpu:gloo,cuda:nccl" if use_cuda else "gloo"
    timeout = datetime.timedelta(seconds=timeout_s)
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
        if use_cuda:
            torch.cuda.set_device(device)
        dist.init_process_group(backend, timeout=timeout, device_id=device if use_cuda else None)
    else:
        local_rank = 0
        device = torch.device("cuda", 0) if use_cuda else torch.device("cpu")
        if use_cuda:
            torch.cuda.set_device(device)
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
    return DistEnv(dist.get_rank(), dist.get_world_size(), local_rank, device)


def broadcast_object(value, src: int = 0):
    """Rank `src`'s value on every rank (e.g. a run directory name chosen from the clock)."""
    box = [value]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def shutdown() -> None:
    if dist.is_initialized():
        # gloo aborts ("terminate called without an active exception") if a rank tears down
        # while a peer still has collectives in flight.
        dist.barrier()
        dist.destroy_process_group()
