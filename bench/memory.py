"""Memory: resident set size of one ``imagen-worker run`` process over a long run.

One real worker subprocess (mock backend, 0 ms latency, 64x64 images, local storage,
concurrency 16). RSS (psutil) is read after the worker has been idle for a few seconds, then
sampled every 0.25 s while it works through N jobs enqueued in one batch. The reading once
the first ``warmup`` jobs are done (caches, pools, allocator arenas filled) is the baseline;
growth is the RSS at the end minus that baseline, and again after a short settle. The soak
(``--soak``: 100,000 jobs) passes when that growth stays within 5 MiB.

``--probe`` also reads the worker from inside (``bench/memprobe``) at the warm-up reading and
at the end: Python objects, pymalloc arenas, glibc's heap split into bytes in use and bytes held
free, and what ``malloc_trim`` gives back, which tells a leak from allocator fragmentation.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import signal
import time
from pathlib import Path
from typing import Any

import asyncpg
import psutil

from bench.common import (
    ROOT,
    insert_jobs,
    machine_info,
    print_table,
    scratch_database,
    scratch_directory,
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


async def _probe(pid: int, base: Path, index: int, sig: signal.Signals) -> dict[str, Any]:
    """Ask the worker's probe for its ``index``-th reading and wait for the file."""
    path = Path(f"{base}.{index}.json")
    os.kill(pid, sig)
    for _ in range(200):
        if path.exists():
            data: dict[str, Any] = json.loads(path.read_text())
            return data
        await asyncio.sleep(0.05)
    raise TimeoutError(f"the worker's memory probe wrote no {path.name}")


def _print_probe(warm: dict[str, Any], end: dict[str, Any]) -> None:
    rows = [
        (label, *(_mb(r[key]) if unit else r[key] for r in (warm, end)))
        for label, key, unit in (
            ("Python objects (gc)", "gc_objects", False),
            ("pymalloc arenas (1 MiB each)", "pymalloc_arenas", False),
            ("malloc heaps, MiB", "malloc_heap", True),
            ("  in use", "malloc_in_use", True),
            ("  held free", "malloc_free", True),
            ("malloc mmap'ed blocks, MiB", "malloc_mmapped", True),
            ("RssAnon, MiB", "rss_anon", True),
        )
    ]
    rows.append(("RssAnon after malloc_trim(0), MiB", "", _mb(end["rss_anon_after_trim"])))
    print_table("Inside the worker (--probe)", ["reading", "after warm-up", "end"], rows)
    grown = collections.Counter(end["gc_types"])
    grown.subtract(warm["gc_types"])
    print("  object types grown most:", ", ".join(f"{k} +{v}" for k, v in grown.most_common(5) if v > 0))


async def run(jobs: int = 10_000, warmup: int | None = None, probe: bool = False) -> dict[str, Any]:
    warmup = warmup if warmup is not None else min(max(jobs // 10, 1_000), jobs)
    info = await machine_info()
    async with scratch_database("bench_memory") as dsn:
        conn = await asyncpg.connect(dsn)
        with scratch_directory("imagen-bench-mem-") as tmp:
            config = write_worker_config(
                tmp,
                backends={"mock": {"type": "mock", "latency_ms": 0, "capacity": 16}},
                worker={"concurrency": 16},
            )
            probe_base = tmp / "probe"
            extra = (
                {"PYTHONPATH": str(ROOT / "bench" / "memprobe"), "IMAGEN_MEMPROBE": str(probe_base)}
                if probe
                else {}
            )
            probes: list[dict[str, Any]] = []
            proc = spawn_worker(worker_env(dsn, config, **extra), tmp / "worker.log")
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
                        if probe:
                            probes.append(await _probe(proc.pid, probe_base, 0, signal.SIGUSR1))
                    if done >= jobs:
                        break
                    if time.monotonic() - started > max(900, jobs / 20):
                        raise TimeoutError(f"only {done} of {jobs} jobs done")
                    await asyncio.sleep(0.25)
                elapsed = time.monotonic() - started
                after = ps.memory_info().rss
                await asyncio.sleep(5)
                settled, settled_anon = ps.memory_info().rss, _anon(proc.pid)
                if probe and probes:
                    probes.append(await _probe(proc.pid, probe_base, 1, signal.SIGUSR2))
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
    if len(probes) == 2:
        _print_probe(*probes)
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
    if len(probes) == 2:
        result["probe"] = {"after_warmup": probes[0], "end": probes[1]}
    write_result(f"{NAME}_probe" if probe else NAME, result)  # a probed run is not the soak's number
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=10_000)
    parser.add_argument("--soak", action="store_true", help="100,000 jobs (overrides --jobs)")
    parser.add_argument("--warmup", type=int, help="jobs done before the baseline reading (default: 10 %%)")
    parser.add_argument(
        "--probe", action="store_true", help="also read Python objects and malloc's heaps inside the worker"
    )
    args = parser.parse_args()
    asyncio.run(run(SOAK_JOBS if args.soak else args.jobs, args.warmup, args.probe))


if __name__ == "__main__":
    main()
