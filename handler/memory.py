"""glibc malloc settings for the worker: keep freed activation memory for the next batch.

Fixed trim and mmap thresholds keep a batch's freed activations in the process instead of faulting
them in again (``make bench-malloc``, docs/BENCHMARKS.md). Linux with glibc only; elsewhere, or with
``KOA_MALLOC=default``, nothing changes. Why: docs/MODEL.md, "Malloc".
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
