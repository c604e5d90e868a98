"""Process group setup: the same code under torchrun, SLURM (launch/) or a plain `python`.

Three ways in:

* torchrun (also one torchrun per node under SLURM, launch/sbatch.sh): torchrun did the
  rendezvous and exported RANK, WORLD_SIZE, MASTER_ADDR/PORT (its own store); ``env://``.
* one process per GPU with the torchrun variables set by ``launch.slurm_env`` from SLURM's
  (``srun python -m launch.slurm_env train.py ...`` or the submitit launcher): rank 0 hosts a
  TCPStore at MASTER_ADDR:MASTER_PORT and every rank must reach it within ``rdzv_timeout_s``;
  a rank that never comes gives a one-line error naming the address and the count that joined.
* neither: a world of one on an in-memory store, so `python train.py` needs no port.

Network interfaces and NCCL settings are environment variables read by the backends
(GLOO_SOCKET_IFNAME, NCCL_SOCKET_IFNAME, NCCL_IB_*, ...): see docs/multinode.md.
"""

from __future__ import annotations

import datetime
import gc
import os
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist

from fsdp_qlora.errors import ConfigError


class RendezvousError(ConfigError):
    """The ranks could not meet (reported as one line on every rank, exit code 2)."""


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _under_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ or os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"


def init_distributed(timeout_s: float = 600.0, rdzv_timeout_s: float = 300.0) -> DistEnv:
    """Join the process group torchrun (or launch.slurm_env) describes, or make a world of one.

    CUDA gets NCCL for tensors on the GPU and gloo for CPU-side objects; CPU gets gloo.
    `timeout_s` bounds every collective; `rdzv_timeout_s` bounds the wait for all ranks to
    arrive when there is no torchrun (torchrun has its own rendezvous timeout).
    """
    use_cuda = torch.cuda.is_available()
    backend = "cpu:gloo,cuda:nccl" if use_cuda else "gloo"
    timeout = datetime.timedelta(seconds=timeout_s)
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
        if use_cuda:
            torch.cuda.set_device(device)
        kwargs = {}
        if not _under_torchrun():
            store = _rendezvous(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), rdzv_timeout_s)
            store.set_timeout(timeout)  # from here on the store serves collectives' setup
            kwargs = {"store": store, "rank": int(os.environ["RANK"]), "world_size": int(os.environ["WORLD_SIZE"])}
        dist.init_process_group(backend, timeout=timeout, device_id=device if use_cuda else None, **kwargs)
    else:
        local_rank = 0
        device = torch.device("cuda", 0) if use_cuda else torch.device("cpu")
        if use_cuda:
            torch.cuda.set_device(device)
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
    return DistEnv(dist.get_rank(), dist.get_world_size(), local_rank, device)


def _rendezvous(rank: int, world_size: int, rdzv_timeout_s: float) -> dist.Store:
    """Rank 0 serves a TCPStore at MASTER_ADDR:MASTER_PORT; all ranks join it within the timeout."""
    missing = [name for name in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(name)]
    if missing:
        _fail(rank, f"RANK and WORLD_SIZE are set but {' and '.join(missing)} not: start the ranks with torchrun, "
                    "or through launch.slurm_env / launch.submit, which set all of them from SLURM")
    host, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    try:
        return dist.TCPStore(host, port, world_size, is_master=rank == 0,
                             timeout=datetime.timedelta(seconds=rdzv_timeout_s), wait_for_workers=True)
    except (dist.DistError, RuntimeError) as err:
        detail = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        if rank == 0:
            what = f"not every rank joined the rendezvous hosted here at {host}:{port}"
        else:
            what = f"rank {rank} could not join the rendezvous at {host}:{port} (rank 0's store)"
        _fail(rank, f"rendezvous timeout after {rdzv_timeout_s:g}s: {what} ({detail}); check that all "
                    f"{world_size} ranks started (squeue/sacct: a node may have died or not started), that "
                    f"{host} is reachable from every node on port {port} (firewall, GLOO_SOCKET_IFNAME/"
                    "NCCL_SOCKET_IFNAME), or raise --rdzv-timeout-s")
    raise AssertionError("unreachable")


def _fail(rank: int, message: str) -> None:
    # train.py prints a ConfigError on rank 0 only; a rendezvous problem matters on every rank.
    if rank != 0:
        print(f"train.py: error: [rank {rank}] {message}", file=sys.stderr, flush=True)
    raise RendezvousError(message)


def broadcast_object(value, src: int = 0):
    """Rank `src`'s value on every rank (e.g. a run directory name chosen from the clock)."""
    box = [value]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def shutdown() -> None:
    # Free unreachable (cyclic) FSDP2 models now, while the process group and the interpreter are
    # alive: collected at interpreter exit, tensors gloo's work objects still reference are destroyed
    # from a thread that cannot take the GIL, and the rank aborts (pytorch/pytorch#179291; seen in a
    # test worker that builds models in a function, tests/workers/unit_gather_worker.py).
    gc.collect()
    if dist.is_initialized():
        # gloo aborts ("terminate called without an active exception") if a rank tears down
        # while a peer still has collectives in flight.
        dist.barrier()
        dist.destroy_process_group()
