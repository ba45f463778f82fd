"""glibc's malloc, tuned for a daemon that runs for weeks: big short-lived buffers stay out of the heap.

Every read from a socket allocates a 256 KiB buffer (asyncio's selector transport, under
asyncpg) and shrinks it to what arrived. glibc serves blocks from 128 KiB up with ``mmap``, but
it raises that threshold, and the heap's trim threshold to twice that, each time a larger
mmap'ed block is freed: after one big block at start-up every 256 KiB read is carved from the
heap, its shrunk remainder stays wherever the buffer began, and free memory at a heap's top is
kept up to the raised trim threshold. The heaps then grow step by step with free holes that are
never given back: resident memory kept rising with every few thousand jobs while the memory in
use stayed flat. Fixed thresholds (glibc's own starting values) turn that adjustment off.
"""

from __future__ import annotations

import ctypes
import os
import sys

# mallopt parameter numbers, <malloc.h>
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 128 * 1024  # blocks this large or larger are mmap'ed, and unmapped when freed
TRIM_THRESHOLD = 128 * 1024  # free memory at a heap's top beyond this is given back
# glibc's own tunables: when the operator set either, glibc applies it (fixed) and we stay out.
OVERRIDE_ENV = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")


def pin_malloc_thresholds(mmap: int = MMAP_THRESHOLD, trim: int = TRIM_THRESHOLD) -> bool:
    """Fix glibc's mmap and trim thresholds; True when both were set.

    Both, because by the time this runs imports may already have raised the trim threshold,
    and setting the mmap threshold alone leaves it there. Nothing is done off Linux, on a C
    library without ``mallopt`` (musl), or when the operator set glibc's variables.
    """
    if sys.platform != "linux" or any(name in os.environ for name in OVERRIDE_ENV):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, mmap)) and bool(mallopt(M_TRIM_THRESHOLD, trim))
