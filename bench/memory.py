"""Memory: resident set size of one ``imagen-worker run`` process over a long run.

One real worker subprocess (mock backend, 0 ms latency, 64x64 images, local storage,
concurrency 16). RSS (psutil) is read after the worker has been idle for a few seconds, then
sampled every 0.25 s while it works through N jobs enqueued in one batch. The reading once
the first ``warmup`` jobs are done (caches, pools, allocator arenas filled) is the baseline;
growth is the RSS at the end minus that baseline, and again after a short settle. The soak
(``--soak``: 100,000 jobs) passes when that growth stays within 5 MiB.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path
from typing import Any

import asyncpg
import psutil

from bench.common import (
    insert_jobs,
    machine_info,
    print_table,
    scratch_database,
    spawn_worker,
    stop_worker,
    wait_for_workers,
    worker_env,
    write_result,
    write_worker_config,
)

NAME = "memory"
SOAK_JOBS = 100_000


def _mb(value: int) -> float:
    return round(value / 2**20, 1)


def _anon(pid: int) -> int:
    """Anonymous resident memory (heap, arenas; no mapped files), Linux's ``RssAnon``; 0 elsewhere.

    RSS also counts pages of shared libraries the first time a code path touches them, which
    looks like growth but is not; the anonymous part is where a leak would show.
    """
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


async def run(jobs: int = 10_000, warmup: int | None = None) -> dict[str, Any]:
    warmup = warmup if warmup is not None else min(max(jobs // 10, 1_000), jobs)
    info = await machine_info()
    async with scratch_database("bench_memory") as dsn:
        conn = await asyncpg.connect(dsn)
        with tempfile.TemporaryDirectory(prefix="imagen-bench-mem-") as tmp:
            config = write_worker_config(
                Path(tmp),
                backends={"mock": {"type": "mock", "latency_ms": 0, "capacity": 16}},
                worker={"concurrency": 16},
            )
            proc = spawn_worker(worker_env(dsn, config), Path(tmp) / "worker.log")
            try:
                await wait_for_workers(conn, 1, timeout=60)
                ps = psutil.Process(proc.pid)
                await asyncio.sleep(3)
                idle = ps.memory_info().rss
                await insert_jobs(conn, jobs)
                started = time.monotonic()
                peak = idle
                warm: int | None = None
                warm_anon = 0
                samples = []
                while True:
                    rss = ps.memory_info().rss
                    peak = max(peak, rss)
                    done = await conn.fetchval("SELECT count(*) FROM imagen.jobs WHERE status = 'done'")
                    samples.append(
                        (round(time.monotonic() - started, 2), done, _mb(rss), _mb(_anon(proc.pid)))
                    )
                    if warm is None and done >= warmup:
                        warm, warm_anon = rss, _anon(proc.pid)
                    if done >= jobs:
                        break
                    if time.monotonic() - started > max(900, jobs / 20):
                        raise TimeoutError(f"only {done} of {jobs} jobs done")
                    await asyncio.sleep(0.25)
                elapsed = time.monotonic() - started
                after = ps.memory_info().rss
                await asyncio.sleep(5)
                settled, settled_anon = ps.memory_info().rss, _anon(proc.pid)
            finally:
                stop_worker(proc)
                await conn.close()
    if warm is None:
        warm, warm_anon = after, settled_anon
    rows = [
        ("idle (3 s after start)", _mb(idle)),
        (f"after warm-up ({warmup:,} jobs done)", _mb(warm)),
        (f"peak while running {jobs:,} jobs", _mb(peak)),
        (f"right after {jobs:,} jobs", _mb(after)),
        ("5 s later", _mb(settled)),
        ("growth after warm-up (5 s later - warm-up)", _mb(settled - warm)),
        ("anonymous part: after warm-up", _mb(warm_anon)),
        ("anonymous part: 5 s later", _mb(settled_anon)),
        ("anonymous growth after warm-up", _mb(settled_anon - warm_anon)),
    ]
    print_table(f"Worker RSS ({jobs:,} jobs in {elapsed:.1f} s)", ["moment", "RSS MiB"], rows)
    growth = _mb(settled - warm)
    print(f"  growth after warm-up: {growth} MiB ({'within' if growth <= 5 else 'OVER'} the 5 MiB goal)")
    result = {
        "machine": info,
        "parameters": {"jobs": jobs, "warmup_jobs": warmup, "concurrency": 16},
        "rss_mib": {
            "idle": _mb(idle),
            "warm": _mb(warm),
            "peak": _mb(peak),
            "after": _mb(after),
            "settled": _mb(settled),
            "growth_after_warmup": growth,
            "anon_warm": _mb(warm_anon),
            "anon_settled": _mb(settled_anon),
            "anon_growth_after_warmup": _mb(settled_anon - warm_anon),
        },
        "seconds": round(elapsed, 2),
        "samples": samples[:: max(1, len(samples) // 60)],
    }
    write_result(NAME, result)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=10_000)
    parser.add_argument("--soak", action="store_true", help="100,000 jobs (overrides --jobs)")
    parser.add_argument("--warmup", type=int, help="jobs done before the baseline reading (default: 10 %%)")
    args = parser.parse_args()
    asyncio.run(run(SOAK_JOBS if args.soak else args.jobs, args.warmup))


if __name__ == "__main__":
    main()
