"""glibc's thresholds are pinned: once a big block was freed, a 256 KiB buffer is still mmap'ed
and a heap still gives back the free memory at its top.

Each scenario runs in a fresh interpreter, so the allocator starts from glibc's defaults and
this test process's own heap is left alone.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(
    sys.platform != "linux" or platform.libc_ver()[0] != "glibc", reason="glibc's malloc only"
)

# Frees a 4 MiB mmap'ed block (which, left alone, raises glibc's mmap threshold to 4 MiB and
# its trim threshold to 8 MiB, as start-up does in the worker), pins or not, then reports
# whether a 256 KiB block, the size of one socket read, was mmap'ed, and whether the heap gave
# back 4 MiB of smaller blocks once they were freed.
SCENARIO = """
import ctypes, json, sys
from imagen_worker.worker.allocator import pin_malloc_thresholds

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
        "fordblks", "keepcost")]

libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
libc.mallinfo2.restype = MallInfo2

libc.free(libc.malloc(4 * 1024 * 1024))
pinned = pin_malloc_thresholds() if sys.argv[1] == "pin" else None  # after it, as in the worker
before = libc.mallinfo2().hblkhd
block = libc.malloc(256 * 1024)
mapped = libc.mallinfo2().hblkhd - before >= 256 * 1024
libc.free(block)
chunks = [libc.malloc(64 * 1024) for _ in range(64)]  # below either threshold: from the heap
heap = libc.mallinfo2().arena
for pointer in reversed(chunks):
    libc.free(pointer)
trimmed = heap - libc.mallinfo2().arena >= 3 * 1024 * 1024
print(json.dumps({"pinned": pinned, "mapped": mapped, "trimmed": trimmed}))
"""


def scenario(mode: str, **env: str) -> dict[str, bool | None]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")} | env
    done = subprocess.run(
        [sys.executable, "-c", SCENARIO, mode], env=environ, capture_output=True, text=True, check=True
    )
    result: dict[str, bool | None] = json.loads(done.stdout)
    return result


def test_after_pinning_a_256_kib_buffer_is_mmaped_and_freed_heap_memory_is_given_back() -> None:
    assert scenario("pin") == {"pinned": True, "mapped": True, "trimmed": True}


def test_left_alone_glibc_keeps_both_in_the_heap_once_a_bigger_block_was_freed() -> None:
    # What the pin prevents: the raised thresholds put every later socket read in the heap and
    # keep megabytes of free memory at its top.
    assert scenario("leave") == {"pinned": None, "mapped": False, "trimmed": False}


def test_an_operators_malloc_variables_win_and_glibc_applies_them() -> None:
    # A fixed 1 MiB mmap threshold from the environment: the 256 KiB block stays in the heap,
    # and the trim threshold stays at glibc's default.
    result = scenario("pin", MALLOC_MMAP_THRESHOLD_=str(1024 * 1024))
    assert result == {"pinned": False, "mapped": False, "trimmed": True}
