"""Host-memory hygiene: keep transient multi-MB tensors from pinning glibc heap memory.

Loading allocates a multi-MB slice per tensor, frees it, and keeps a small quantized result;
every training step dequantizes each NF4 weight (forward and backward) into a multi-MB
transient and keeps small survivors (activations, adapter gradients, optimizer state). Served
from glibc's heap, each small survivor pins the freed hole behind it, so the heap keeps growing
by freed-but-unreturnable memory, by an amount that depends on how the allocations happen to
interleave. Served by mmap, a freed large block goes back to the OS at once: RSS then follows
what is live, and the peak is repeatable.

Measured on one rank (2-core CPU, glibc 2.36), 1.14 GB bf16 checkpoint (12 Llama layers, hidden
2048, 5 shards of 218-239 MB), NF4 held 300 MB; peak RSS growth over load + first step (64 tokens):

  threshold back at 32 MiB after the load (the earlier guard): 724-1030 MB over 10 runs. The load
      alone peaked at 576-592 MB every time; the first step then grew the heap to 700-860 MB with
      ~204 MB of it in use (mallinfo2), and malloc_trim(0) after the step brought RSS growth from
      851-920 back to 373 MB: the varying part is freed heap glibc cannot return, not live tensors.
      MALLOC_ARENA_MAX=1 (951-1051 MB) and one reader thread (925-1059 MB) change nothing: the
      per-thread arenas and the reader threads are not the cause.
  threshold kept at 1 MiB through the step (this module): 577-587 MB over 7 runs, the load's own
      peak; the step stays below it (RSS growth after it 499-528 MB).

Cost, CPU training only (on a GPU the dequantized weights are device memory): every >= 1 MiB
transient gets fresh pages. That model's steady 64-token step went from 1.1-1.5 s to 1.7-2.2 s
(440-680k minor faults, +0.5-0.8 s system time per step); it does not grow with the tokens, and
GLIBC_TUNABLES=glibc.malloc.hugetlb=1 (huge pages for mmapped blocks) brought it to 1.1-1.5 s.

So a CPU training run keeps the mmap threshold through the load only, and then reuses freed
memory for its steps (`reuse_freed_memory`, called by train/loop.py): SmolLM2-135M over 2 CPU
ranks went from ~310 to ~360 tokens/s (minor faults per rank and step from ~23k to under 2k). The
load's bound and its repeatability are unchanged; the first step on top of it varies with how its
allocations interleave (476-557 MB of growth on tests/test_loader_memory.py's model, where the load
alone peaks at ~450 MB): the price of the speed, as with CUDA's caching allocator. Huge pages for the
mmapped blocks were no substitute on this kernel (THP in madvise mode): 316 tokens/s, faults down
but the step no faster.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools

import torch

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameter numbers (malloc.h)
# Blocks of at least this many bytes are mmapped. The loader's slices and a step's dequantized
# weights are MBs; Python objects and small tensors stay on the (fast, reused) heap.
MMAP_THRESHOLD_BYTES = 1 << 20


@functools.cache
def _libc():
    name = ctypes.util.find_library("c")
    return ctypes.CDLL(name) if name else None


def serve_large_allocations_by_mmap() -> bool:
    """For the rest of the process, serve blocks >= 1 MiB by mmap (see the module docstring).

    Idempotent. Returns False (and does nothing) outside glibc. This also fixes the threshold:
    glibc's dynamic threshold would otherwise rise to the size of the largest block freed (up
    to 32 MiB), which puts the transients back on the heap after the first few frees.
    """
    libc = _libc()
    mallopt = getattr(libc, "mallopt", None)
    return bool(mallopt is not None and mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES))


# CPU training (`reuse_freed_memory`): blocks up to 32 MiB (glibc's largest mmap threshold) come from
# the heap, and up to 1 GiB of freed heap stays with the process for the next step.
REUSE_MMAP_THRESHOLD_BYTES = 32 << 20
REUSE_TRIM_THRESHOLD_BYTES = 1 << 30


def reuse_freed_memory(device: torch.device) -> bool:
    """For the rest of the process, keep freed blocks for reuse instead of returning them to the OS:
    what CUDA's caching allocator does for device memory, done for a CPU training loop.

    Every step allocates the same multi-MB transients again (each dequantized weight, the MLP's
    activations and their gradients). Served by mmap, each comes back as fresh pages, faulted and
    zeroed by the kernel: on SmolLM2-135M over 2 CPU ranks (FSDP2, batch 2 x 256 tokens) that was
    ~23k minor faults and ~50 ms of system time per rank and step, and 310 tokens/s against 360 with
    the blocks reused (docs/benchmarks.md). Called after the load, whose host-memory bound holds as
    before (`large_allocations_via_mmap`). RSS no longer drops between steps, and what the first
    step adds on top of the load varies from run to run (tests/test_loader_memory.py). Only on CPU:
    on a GPU a step's transients are device memory. Returns False (and does nothing) for another
    `device` than the CPU, and outside glibc.
    """
    mallopt = getattr(_libc(), "mallopt", None)
    return bool(device.type == "cpu" and mallopt is not None and mallopt(M_MMAP_THRESHOLD, REUSE_MMAP_THRESHOLD_BYTES)
                and mallopt(M_TRIM_THRESHOLD, REUSE_TRIM_THRESHOLD_BYTES))


def release_free_heap() -> None:
    """Return the heaps' free pages to the OS (malloc_trim(0)); a no-op outside glibc."""
    trim = getattr(_libc(), "malloc_trim", None)
    if trim is not None:
        trim(0)


@contextlib.contextmanager
def large_allocations_via_mmap():
    """The loader's guard: blocks >= 1 MiB by mmap from here on, free heap returned at the end.

    The threshold is deliberately *not* restored on exit: the first training step follows the
    load, and with glibc's 32 MiB it grew peak RSS by a varying 150-450 MB on top of the load's
    peak (module docstring); with the threshold kept, load + steps stay within the bound the
    loader states (held weights + largest shard + 128 MB, tests/test_loader_memory.py).
    Without the guard at all the load itself grew host memory by about one slice per tensor
    (+650 MB for a 390 MB model).
    """
    serve_large_allocations_by_mmap()
    try:
        yield
    finally:
        release_free_heap()
