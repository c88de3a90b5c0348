"""glibc malloc settings for the worker: keep freed activation memory for the next batch.

A batch of 16 knee images allocates and frees tens of megabytes of activations. glibc's default
is to hand freed memory at the top of the heap back to the kernel once more than a threshold
(at most 64 MB with its dynamic tuning) is free, so, we infer, every batch faults the same pages
in again. Fixing the thresholds keeps that memory in the process: on the 2-core CPU machine the
handler's request path at batch 16 went from 95 to 116 images/s (x1.22, medians of five fresh processes
each way, `make bench-malloc`, docs/BENCHMARKS.md) for about 100 MB more resident memory.
Allocations of 32 MB or more are still mapped and unmapped on their own, and at most 256 MB of
free heap is kept.

Linux with glibc only; elsewhere, or with ``KOA_MALLOC=default``, nothing changes.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

from model.settings import MALLOC

M_TRIM_THRESHOLD = -1  # from glibc's malloc.h
M_MMAP_THRESHOLD = -3
TRIM_BYTES = 256 << 20
MMAP_BYTES = 32 << 20  # glibc's maximum on 64-bit
ENV = MALLOC.name


def keep_freed_memory() -> bool:
    """Set glibc's trim and mmap thresholds for this process. True if they were set."""
    if MALLOC.get().strip().lower() == "default" or not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    # mmap first: setting either turns glibc's dynamic tuning off, and the pair only helps together.
    return mallopt(M_MMAP_THRESHOLD, MMAP_BYTES) == 1 and mallopt(M_TRIM_THRESHOLD, TRIM_BYTES) == 1
