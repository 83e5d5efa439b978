"""Host allocator settings for CPU runs.

glibc's malloc serves blocks above its mmap threshold (dynamic, up to 32 MiB) with fresh
``mmap`` calls and returns freed memory at the top of the heap to the OS once more than its trim
threshold is free. A diffusion step frees and reallocates the same activations every step, so
an uncached CPU run paid tens of thousands of page faults per step (measured on the ``cpu``
benchmark preset: 33,700 minor faults and 12-19% of an fp32 full step, by run).
:func:`keep_freed_host_memory` fixes both thresholds so freed blocks stay in the process and
are reused. It changes no result, only where host memory comes from. It is a no-op where the C
library is not glibc, where the user already chose (``MALLOC_MMAP_THRESHOLD_`` /
``MALLOC_TRIM_THRESHOLD_`` set, or an allocator preloaded with ``LD_PRELOAD`` such as jemalloc
or tcmalloc), or with ``OPENSORA_DUCA_HOST_MALLOC=default``.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
#: glibc's largest accepted mmap threshold on 64-bit systems (HEAP_MAX_SIZE / 2)
MMAP_THRESHOLD = 32 * 2 ** 20
TRIM_THRESHOLD = 2 ** 30

_applied = None


def keep_freed_host_memory() -> bool:
    """Keep freed host blocks for reuse (see the module docstring). Returns whether the
    settings are in effect; safe to call more than once."""
    global _applied
    if _applied is not None:
        return _applied
    _applied = False
    if not sys.platform.startswith("linux"):
        return False
    if os.environ.get("OPENSORA_DUCA_HOST_MALLOC", "") == "default":
        return False
    if any(k in os.environ for k in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")):
        return False
    if os.environ.get("LD_PRELOAD", "").strip():
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
        libc.gnu_get_libc_version  # glibc only
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    _applied = bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)) and bool(
        mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD))
    return _applied
