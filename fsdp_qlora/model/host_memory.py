"""Host-memory hygiene for the streaming loader: keep transient slices from pinning heap memory."""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util


@contextlib.contextmanager
def large_allocations_via_mmap():
    """Keep glibc from growing its heap with the loader's transient tensors.

    Loading allocates a multi-MB slice per tensor, frees it, and keeps a small quantized result.
    glibc's dynamic mmap threshold soon serves such slices from the heap, where each small
    survivor pins the hole behind it: host memory then grows by about one slice per tensor
    (measured: +650 MB for a 390 MB model with one thread per rank). Serving >= 1 MiB blocks
    by mmap returns them to the OS on free. Outside glibc this is a no-op.
    """
    libc_name = ctypes.util.find_library("c")
    libc = ctypes.CDLL(libc_name) if libc_name else None
    mallopt = getattr(libc, "mallopt", None)
    m_mmap_threshold = -3
    if mallopt is None or not mallopt(m_mmap_threshold, 1 << 20):
        yield
        return
    try:
        yield
    finally:
        mallopt(m_mmap_threshold, 32 << 20)  # glibc's own ceiling for its dynamic threshold
        getattr(libc, "malloc_trim", lambda _: 0)(0)
