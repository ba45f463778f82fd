"""``bench.memory --probe``: what the worker's memory consists of, read inside the worker.

Python imports ``sitecustomize`` at start-up from any directory on ``PYTHONPATH``; the memory
bench puts this directory there only with ``--probe``, so the product carries no debug hook.
On SIGUSR1 the worker writes ``$IMAGEN_MEMPROBE.<n>.json``: live object counts by type, pymalloc
arenas, glibc's ``mallinfo2`` (heap size, bytes in use, bytes free) and ``RssAnon``. SIGUSR2
does the same, then calls ``malloc_trim(0)`` and reads ``RssAnon`` again: what that gives back
was held free by malloc, not in use.
"""

from __future__ import annotations

import os

if os.environ.get("IMAGEN_MEMPROBE"):
    import collections
    import ctypes
    import gc
    import json
    import signal
    import sys
    import tempfile
    from typing import Any

    class _MallInfo2(ctypes.Structure):
        _fields_ = [
            (name, ctypes.c_size_t)
            for name in (
                "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
                "fordblks", "keepcost",
            )
        ]  # fmt: skip

    _libc = ctypes.CDLL(None)
    _libc.mallinfo2.restype = _MallInfo2
    _count = [0]

    def _status(field: str) -> int:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
        return 0

    def _pymalloc_arenas() -> int:
        with tempfile.TemporaryFile() as out:
            saved = os.dup(2)
            os.dup2(out.fileno(), 2)
            try:
                sys._debugmallocstats()
            finally:
                os.dup2(saved, 2)
                os.close(saved)
            out.seek(0)
            for line in out.read().decode().splitlines():
                if line.startswith("# arenas allocated current"):
                    return int(line.split("=")[1])
        return 0

    def _dump(signum: int, _frame: Any) -> None:
        n = _count[0]
        _count[0] += 1
        gc.collect()  # count what is reachable, not cycles waiting for the next collection
        info = _libc.mallinfo2()
        types = collections.Counter(type(o).__qualname__ for o in gc.get_objects())
        data: dict[str, Any] = {
            "rss_anon": _status("RssAnon"),
            "threads": _status("Threads") // 1024,
            "gc_objects": sum(types.values()),
            "gc_types": dict(types.most_common(40)),
            "pymalloc_arenas": _pymalloc_arenas(),
            "malloc_heap": info.arena,
            "malloc_in_use": info.uordblks,
            "malloc_free": info.fordblks,
            "malloc_mmapped": info.hblkhd,
        }
        if signum == signal.SIGUSR2:
            _libc.malloc_trim(0)
            data["rss_anon_after_trim"] = _status("RssAnon")
        path = f"{os.environ['IMAGEN_MEMPROBE']}.{n}.json"
        with open(path + ".tmp", "w") as out:
            json.dump(data, out)
        os.replace(path + ".tmp", path)

    signal.signal(signal.SIGUSR1, _dump)
    signal.signal(signal.SIGUSR2, _dump)
