"""glibc allocator settings for a process that churns through megabyte-sized buffers.

Every chunk passes through several fresh 1–8 MiB buffers (read, compressed, sealed, packed). By
default glibc serves each from a new mmap and unmaps it on free, so every buffer costs page faults
and zeroing: a third of a backup's CPU time went to the kernel. Keeping such buffers on the heap
lets freed memory be reused; ``release_free_memory`` gives it back after a large one-off
allocation (loading the index). Elsewhere than glibc these are no-ops.
"""

from __future__ import annotations

import ctypes
import ctypes.util

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
    except OSError:
        return None
    return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None


def tune_for_large_buffers() -> None:
    libc = _libc()
    if libc is not None:
        libc.mallopt(_M_MMAP_THRESHOLD, 32 * 1024 * 1024)
        libc.mallopt(_M_TRIM_THRESHOLD, 64 * 1024 * 1024)


def release_free_memory() -> None:
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)
