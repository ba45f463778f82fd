"""Housekeeping: how long ``imagen prune`` takes on a large history, and whether the queue notices.

Two shapes of history, each loaded into a scratch database with one ``INSERT ... SELECT`` of
ended jobs (with their ``job_runs`` rows, which the prune removes by cascade) and
``VACUUM ANALYZE``'d:

* *first prune*: ``--rows`` jobs that ended 100 days ago, stored before a fifth as many recent
  ones, as when a year of history meets its first prune;
* *daily prune*: as many jobs, one in twelve of them old and spread through the table, as a
  daily timer finds them.

The real ``prune.prunable`` (the dry run) and ``prune.prune`` (90-day cutoff, batches of 5,000)
are timed from the client. Meanwhile another connection claims new jobs through the real
claim statement (``Queue.claim``, one INSERT and one claim at a time) and times each claim;
the same loop alone, before the prune, is the baseline. A prune that locked the queue or
starved it of I/O would show in the claims' tail.
"""

from __future__ import annotations

import argparse
import asyncio
import time
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

from bench.common import insert_jobs, machine_info, print_table, scratch_database, summary_ms, write_result
from imagen_worker.db.connect import connect
from imagen_worker.queue import prune
from imagen_worker.queue.jobs import Queue

NAME = "prune"
CUTOFF = timedelta(days=90)

# $1 rows; $2: every $2-th row is old (1: the first $1 rows are all old), $3 recent rows after.
LOAD = """
WITH ended AS (
    INSERT INTO imagen.jobs (owner_user_id, prompt, status, error, created_at, finished_at)
    SELECT ('00000000-0000-4000-8000-' || lpad(to_hex(g % 1000), 12, '0'))::uuid,
           'an ended job number ' || g, 'failed', 'told to fail',
           now() - interval '101 days',
           CASE WHEN g % $2::int = 0 AND g <= $1::int THEN now() - interval '100 days' ELSE now() END
    FROM generate_series(1, $1::int + $3::int) AS g
    RETURNING id
)
INSERT INTO imagen.job_runs (job_id, worker_id, attempt)
SELECT id, '00000000-0000-4000-8000-00000000beef', 1 FROM ended
"""


async def _claims(dsn: str, stop: asyncio.Event, durations: list[float]) -> None:
    """Insert one job and claim it, again and again, timing each claim statement."""
    conn = await connect(dsn)
    try:
        queue = Queue(conn, uuid.uuid4())
        while not stop.is_set():
            await insert_jobs(conn, 1)
            started = time.perf_counter()
            await queue.claim("mock", is_default=True, limit=1, lease_seconds=60)
            durations.append(time.perf_counter() - started)
            await asyncio.sleep(0.005)
    finally:
        await conn.close()


async def scenario(name: str, rows: int, every: int, recent: int, *, baseline: float = 3.0) -> dict[str, Any]:
    """Load the history, time the claims alone for ``baseline`` seconds, then the dry run and
    the prune with claims alongside."""
    async with scratch_database(f"bench_prune_{name.replace(' ', '_')}", migrated=True) as dsn:
        conn = await connect(dsn)
        try:
            started = time.perf_counter()
            await conn.execute(LOAD, rows, every, recent)
            await conn.execute("VACUUM ANALYZE imagen.jobs, imagen.job_runs")
            load_seconds = time.perf_counter() - started

            idle: list[float] = []
            stop = asyncio.Event()
            alone = asyncio.create_task(_claims(dsn, stop, idle))
            await asyncio.sleep(baseline)
            stop.set()
            await alone

            before = datetime.now(UTC) - CUTOFF
            started = time.perf_counter()
            found = await prune.prunable(conn, before)
            dry_seconds = time.perf_counter() - started

            during: list[float] = []
            stop = asyncio.Event()
            claiming = asyncio.create_task(_claims(dsn, stop, during))
            started = time.perf_counter()
            removed = await prune.prune(conn, before)
            prune_seconds = time.perf_counter() - started
            stop.set()
            await claiming
        finally:
            await conn.close()
    assert removed == found, (removed, found)
    total = sum(removed.jobs.values())
    return {
        "scenario": name,
        "rows": rows + recent,
        "removed": total,
        "load_seconds": round(load_seconds, 1),
        "dry_run_seconds": round(dry_seconds, 3),
        "prune_seconds": round(prune_seconds, 3),
        "removed_per_second": round(total / prune_seconds),
        "claim_idle": summary_ms(idle),
        "claim_during_prune": summary_ms(during),
    }


async def run(rows: int) -> dict[str, Any]:
    info = await machine_info()
    results = [
        await scenario("first prune", rows, 1, rows // 5),
        await scenario("daily prune", rows + rows // 5, 12, 0),
    ]
    print_table(
        "imagen prune on a large history (90-day cutoff, batches of 5,000; claims timed meanwhile)",
        ["scenario", "rows", "removed", "dry run s", "prune s", "removed/s", "claim p50 idle",
         "claim p50 during", "claim p95 during", "claim max during"],
        [(r["scenario"], f"{r['rows']:,}", f"{r['removed']:,}", r["dry_run_seconds"], r["prune_seconds"],
          f"{r['removed_per_second']:,}", r["claim_idle"]["p50_ms"], r["claim_during_prune"]["p50_ms"],
          r["claim_during_prune"]["p95_ms"], r["claim_during_prune"]["max_ms"]) for r in results],
    )  # fmt: skip
    out = {"machine": info, "parameters": {"rows": rows}, "scenarios": results}
    write_result(NAME, out)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    args = parser.parse_args()
    asyncio.run(run(args.rows))


if __name__ == "__main__":
    main()
