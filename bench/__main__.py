"""``python -m bench`` (``make bench``): every benchmark in sequence; the 100,000-job soak is the longest.

Each prints its table and writes ``bench/results/<name>.json``. ``--only NAME ...`` runs a
subset. The chaos run is separate: ``python -m bench.chaos`` (``make chaos``).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time
from collections.abc import Callable, Coroutine
from typing import Any

import asyncpg

from bench import (
    backlog_scale,
    fairness,
    gpu_utilisation,
    memory,
    overhead,
    pickup_latency,
    prune,
    throughput,
    write_stage,
)
from bench.common import removals_deferred, server_dsn

# The overhead comes first: one job at a time, it measures milliseconds that the heavy runs'
# leftovers (about 100,000 files created and deleted, gigabytes of dropped scratch databases)
# inflate for minutes afterwards, a CHECKPOINT and a sync notwithstanding.
BENCHMARKS: dict[str, Callable[[], Coroutine[Any, Any, Any]]] = {
    "overhead": lambda: overhead.run(jobs=300),
    "pickup_latency": lambda: pickup_latency.run(jobs=1000, backlog_rows=10_000),
    "write_stage": lambda: write_stage.run(jobs=50, size=1024),
    "throughput": lambda: throughput.run(jobs=4000, repeat=3),
    "memory": lambda: memory.run(jobs=memory.SOAK_JOBS),
    "backlog_scale": lambda: backlog_scale.run((0, 100_000, 1_000_000)),
    "fairness": lambda: fairness.run(rows=1_000_000, owners=10_000),
    "gpu_utilisation": lambda: gpu_utilisation.run(jobs=200, gpu_ms=200, upload_ms=150),
    "prune": lambda: prune.run(rows=1_000_000),
}


async def checkpoint() -> None:
    """Write PostgreSQL's dirty pages now, so no benchmark pays for the previous one's."""
    conn = await asyncpg.connect(server_dsn())
    try:
        await conn.execute("CHECKPOINT")
    except asyncpg.InsufficientPrivilegeError:
        pass  # not a superuser: the sync below still settles the disk
    finally:
        await conn.close()


def main() -> None:
    parser = argparse.ArgumentParser(description="Run the imagen-worker benchmarks.")
    parser.add_argument("--only", nargs="+", choices=sorted(BENCHMARKS), help="run only these")
    args = parser.parse_args()
    started = time.monotonic()
    with removals_deferred():  # no benchmark's file writes pay for the one before's removals
        for name in args.only or BENCHMARKS:
            # Each starts on a quiet disk: the burn-downs leave thousands of files being written
            # back and PostgreSQL's pages to flush, which made the next benchmark's fsyncs (the
            # overhead's write stage) 3x slower.
            asyncio.run(checkpoint())
            os.sync()
            time.sleep(2)
            t0 = time.monotonic()
            print(f"\n=== {name} ===", flush=True)
            asyncio.run(BENCHMARKS[name]())
            print(f"  ({name}: {time.monotonic() - t0:.0f} s)", flush=True)
    print(f"\nall benchmarks: {time.monotonic() - started:.0f} s")


if __name__ == "__main__":
    main()
