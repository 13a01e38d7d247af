"""glibc's allocator kept from handing a cohort's buffers back to the kernel between uses.

A cohort allocates and frees megabytes per client (stacked weights, per-client replies of the
whole model, their `.npy` bytes). glibc serves large blocks with `mmap` and trims the heap's
free top back to the kernel, so every such buffer came back as fresh pages for the kernel to
zero: at 1,000 Beauty clients a round, 8 of the process's 17 s were system time. Raising both
thresholds keeps freed memory for the next client (a round's peak is unchanged, since every
buffer is reused). Centralized training does the same, so the two compare like for like.
Elsewhere than glibc this does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3  # glibc's <malloc.h>
SETTINGS = {M_MMAP_THRESHOLD: 2**30, M_TRIM_THRESHOLD: 2**31 - 1, M_TOP_PAD: 2**28}


@functools.cache
def keep_freed_memory() -> bool:
    """Apply `SETTINGS` once per process; whether the C library took them."""
    name = ctypes.util.find_library("c")
    try:
        mallopt = ctypes.CDLL(name).mallopt if name else None
    except (OSError, AttributeError):
        mallopt = None
    if mallopt is None:
        return False
    return all(mallopt(option, value) == 1 for option, value in SETTINGS.items())
