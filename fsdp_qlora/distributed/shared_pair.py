"""Two ranks on one host exchange buffers through shared memory instead of gloo's sockets.

A gloo message between two processes on a 2-core CPU goes through loopback TCP and gloo's own I/O
thread, which needs a core while both ranks compute: an exchange of 64 KiB (tiny-llama's bf16
adapters, half each) took a median ~0.8-1.0 ms and ~4 ms at the 90th percentile, against ~0.02 ms
and ~1 ms (the other rank's lag) through shared memory (two processes, 400 exchanges between
matmuls; docs/benchmarks.md). FSDP2's all-gather and gradient reduction are two such exchanges
at every step (distributed/pair.py).

The channel is a file in /dev/shm that both ranks map, unlinked as soon as both hold it (a rank
killed after that leaves nothing behind). Each rank owns two slots; a message larger than a slot
goes in slot-sized chunks, in lockstep. A chunk is written, then its sequence number is published;
the peer waits for the number, copies the chunk out and acknowledges it, and a slot is written
again only after the peer acknowledged what it held. An exchange is synchronous: both ranks are in
the same call, and it returns complete. `pair.all_reduce` runs even the all-reduces asked for
asynchronously through it, where they start (``--sharding ddp``'s buckets during backward): gloo's
thread would not progress them anyway while both ranks compute on the two cores, and left them to
the end of backward (SmolLM2-135M: 45 ms a step waiting there on average, against 3 ms; 31 against
16 ms more at their starts; docs/benchmarks.md).

The order of the writes is the order the other process sees them only under x86's total store
order (a store is not reordered after a later store, nor a load after a later load); elsewhere
`open_channel` declines and the pair stays on gloo.
"""

from __future__ import annotations

import mmap
import os
import platform
import socket
import tempfile
import time

import numpy as np
import torch
import torch.distributed as dist

SHM_DIR = "/dev/shm"
SLOT_BYTES = 1 << 20  # 1 MiB: tiny-llama's exchanges fit one slot, SmolLM2-135M's 9.8 MB take 10 chunks
HEADER_BYTES = 64  # per rank: the sequence number it published, the one it acknowledged (int64 each)
WAIT_TIMEOUT_S = 600.0  # as the process group's own (distributed/env.py `init_distributed`)


class SharedPair:
    """A two-rank channel over one shared mapping (`open_channel` builds it). The mapping is read and
    written through numpy views, never through torch operators: memory trackers that count the
    storages a training step's operators touch (the planner's test) then do not count this fixed 4 MiB
    of host memory, as they do not count gloo's own buffers."""

    def __init__(self, mapping: mmap.mmap, rank: int, peer_pid: int):
        self._rank, self._peer, self._peer_pid = rank, 1 - rank, peer_pid
        counters = np.frombuffer(mapping, dtype=np.int64, count=2 * HEADER_BYTES // 8).reshape(2, HEADER_BYTES // 8)
        self._published, self._acknowledged = counters[:, 0], counters[:, 1]
        self._slots = np.frombuffer(mapping, dtype=np.uint8, offset=2 * HEADER_BYTES).reshape(2, 2, SLOT_BYTES)
        self._sequence = 0

    def exchange(self, send: torch.Tensor, receive: torch.Tensor) -> None:
        """Send `send`'s bytes to the peer and fill `receive` (the same number of bytes) with the
        peer's `send`; both ranks call it at the same point, as for a collective."""
        outgoing, incoming = _bytes(send), _bytes(receive)
        if outgoing.size != incoming.size:
            raise ValueError(f"exchange of {outgoing.size} bytes into a {incoming.size}-byte buffer")
        for start in range(0, max(outgoing.size, 1), SLOT_BYTES):
            stop = min(start + SLOT_BYTES, outgoing.size)
            self._sequence += 1
            slot = self._sequence % 2
            self._wait_until(self._acknowledged, self._sequence - 2)  # the peer has read what the slot held
            self._slots[self._rank, slot, :stop - start] = outgoing[start:stop]
            self._published[self._rank] = self._sequence
            self._wait_until(self._published, self._sequence)
            incoming[start:stop] = self._slots[self._peer, slot, :stop - start]
            self._acknowledged[self._rank] = self._sequence

    def _wait_until(self, counters: np.ndarray, sequence: int) -> None:
        """Spin (yielding the core) until the peer's counter reaches `sequence`. Every few thousand
        spins (milliseconds) it checks that the peer process still runs, as a closed gloo socket
        would tell: a killed peer then fails this rank at once instead of at the timeout."""
        deadline = None
        spins = 0
        while int(counters[self._peer]) < sequence:
            os.sched_yield()
            spins += 1
            if spins % 4096 == 0:
                deadline = deadline or time.monotonic() + WAIT_TIMEOUT_S
                if not _running(self._peer_pid):
                    raise RuntimeError(f"rank {self._rank}: the other rank of the pair (pid {self._peer_pid}) "
                                       "exited during an exchange")
                if time.monotonic() > deadline:
                    raise RuntimeError(f"rank {self._rank}: the other rank of the pair did not reach exchange "
                                       f"{sequence} within {WAIT_TIMEOUT_S:.0f} s")


def open_channel(group: dist.ProcessGroup) -> SharedPair | None:
    """A `SharedPair` for `group` (two gloo ranks), or None where shared memory cannot serve it:
    not x86, no /dev/shm or no room in it, or the ranks on different hosts. A collective over
    `group`: both ranks must call it, at the same point, and both get a channel or both None."""
    rank = dist.get_rank(group)
    # One gather: rank 0's file, and every rank's host and process id.
    seen = [None, None]
    dist.all_gather_object(seen, (_create_mapping_file() if rank == 0 else None, _host_id(), os.getpid()), group=group)
    (path, host, _), (_, other_host, _) = seen
    mapping = None
    # /proc: how a waiting rank sees that the other one has exited (`_running`)
    if path is not None and host == other_host and platform.machine() in ("x86_64", "AMD64") and _running(os.getpid()):
        try:
            mapping = _map(path)
        except (OSError, ValueError):
            pass
    usable = torch.tensor([0 if mapping is None else 1])
    dist.all_reduce(usable, op=dist.ReduceOp.MIN, group=group)  # both map it (then the name can go), or neither uses it
    if rank == 0 and path is not None:
        os.unlink(path)
    return SharedPair(mapping, rank, seen[1 - rank][2]) if int(usable) else None


def _running(pid: int) -> bool:
    """Whether process `pid` (on this host) exists and has not exited (a zombie has)."""
    try:
        with open(f"/proc/{pid}/stat") as file:
            state = file.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def _map(path: str) -> mmap.mmap:
    """The file's bytes, shared with every process that maps it."""
    with open(path, "r+b") as file:
        return mmap.mmap(file.fileno(), _mapping_bytes(), mmap.MAP_SHARED)


def _create_mapping_file() -> str | None:
    """A zero-filled file of the mapping's size in /dev/shm (its counters start at 0), or None."""
    if not os.path.isdir(SHM_DIR):
        return None
    try:
        stats = os.statvfs(SHM_DIR)
        if stats.f_bavail * stats.f_frsize < 2 * _mapping_bytes():
            return None
        fd, path = tempfile.mkstemp(prefix="fsdp_qlora-pair-", dir=SHM_DIR)
        with os.fdopen(fd, "wb") as file:
            file.truncate(_mapping_bytes())
        return path
    except OSError:
        return None


def _mapping_bytes() -> int:
    return 2 * HEADER_BYTES + 2 * 2 * SLOT_BYTES


def _host_id() -> str:
    """This machine: its hostname and boot id (containers on one host may share a hostname)."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as file:
            boot = file.read().strip()
    except OSError:
        boot = ""
    return f"{socket.gethostname()}/{boot}"


def _bytes(tensor: torch.Tensor) -> np.ndarray:
    """`tensor`'s memory as a numpy byte array (writes go to the tensor)."""
    if not tensor.is_contiguous() or tensor.device.type != "cpu":
        raise ValueError("exchange needs contiguous host buffers")
    return tensor.detach().reshape(-1).view(torch.uint8).numpy()
