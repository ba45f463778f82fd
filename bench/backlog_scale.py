"""Backlog scale: the claim statement's latency with 0, 100,000 and 1,000,000 pending rows.

A scratch database is bulk-loaded with ``INSERT ... SELECT generate_series`` (pending rows,
``run_at`` in the past, so every row is claimable) and ``VACUUM ANALYZE``'d. Then the real
claim statement (``Queue.claim``, the one in ``queries.sql``, asyncpg over TCP, autocommit)
is timed from the client, claiming 1 row per call (and, separately, 10 rows per call). Each
claim runs in its own transaction: the statement's round trip is the number reported, the
commit (a WAL flush, since the claim wrote) is reported beside it.
``EXPLAIN (ANALYZE, BUFFERS)`` of one claim gives the
server-side execution time. A second table shape is measured too: the same number of pending
rows for *another* backend that a live worker serves, with 10 claimable rows behind them,
which the claim has to filter row by row. A third: every runnable row of one owner (a
terminal user's batch), the shape whose owner statistics once led the planner to read the
whole table.
"""

from __future__ import annotations

import argparse
import asyncio
import time
import uuid
from typing import Any

import asyncpg

from bench.common import machine_info, print_table, scratch_database, summary_ms, write_result
from imagen_worker.db.connect import connect
from imagen_worker.queries import sql
from imagen_worker.queue.jobs import Queue

NAME = "backlog_scale"

LOAD = """
INSERT INTO imagen.jobs (owner_user_id, prompt, backend, width, height, run_at, created_at)
SELECT coalesce($3::uuid, gen_random_uuid()), 'backlog job number ' || g || ', a lighthouse at dusk',
       $2, 512, 512,
       now() - make_interval(secs => $1 - g), now() - make_interval(secs => $1 - g)
FROM generate_series(1, $1) AS g
"""


async def _load(
    conn: asyncpg.Connection, rows: int, backend: str | None, owner: uuid.UUID | None = None
) -> float:
    """``rows`` pending jobs, each of its own owner, or all of ``owner``'s."""
    await conn.execute("TRUNCATE imagen.jobs, imagen.images, imagen.workers CASCADE")
    started = time.monotonic()
    if rows:
        await conn.execute(LOAD, rows, backend, owner)
    await conn.execute("VACUUM ANALYZE imagen.jobs")
    return time.monotonic() - started


async def _time_claims(conn: asyncpg.Connection, queue: Queue, calls: int, limit: int) -> dict[str, Any]:
    """Time the claim statement alone (inside a transaction), and its commit separately."""
    statement, commit, orphan_check = [], [], []
    claimed = 0
    for _ in range(calls):
        # The worker refreshes the orphan list once per poll interval, not per claim: timed apart.
        t_orphans = time.perf_counter()
        orphans = await queue.orphan_backends()
        orphan_check.append(time.perf_counter() - t_orphans)
        tr = conn.transaction()
        await tr.start()
        t0 = time.perf_counter()
        jobs = await queue.claim("mock", is_default=True, orphans=orphans, limit=limit, lease_seconds=30)
        t1 = time.perf_counter()
        await tr.commit()
        commit.append(time.perf_counter() - t1)
        statement.append(t1 - t0)
        claimed += len(jobs)
    return {
        **summary_ms(statement),
        "claimed": claimed,
        "commit": summary_ms(commit),
        "orphan_check": summary_ms(orphan_check),
    }


async def measure(dsn: str, rows: int, shape: str, calls: int) -> dict[str, Any]:
    conn = await connect(dsn)
    try:
        if shape == "runnable":
            load_s = await _load(conn, rows, None)
        elif shape == "one owner":
            load_s = await _load(conn, rows, None, uuid.uuid4())
        else:
            load_s = await _load(conn, rows, "other-gpu")
            await conn.execute(
                """INSERT INTO imagen.workers (id, hostname, pid, backends, expires_at)
                   VALUES (gen_random_uuid(), 'bench-other', 1, ARRAY['other-gpu'],
                           now() + interval '1 day')"""
            )
            await conn.execute(
                """INSERT INTO imagen.jobs (owner_user_id, prompt, width, height)
                   SELECT gen_random_uuid(), 'claimable ' || g, 64, 64 FROM generate_series(1, $1) g""",
                calls * 11 + 5,
            )
            await conn.execute("ANALYZE imagen.jobs")
        worker_id = uuid.uuid4()
        queue = Queue(conn, worker_id)
        explain = await _explain_rolled_back(conn, worker_id)
        one = await _time_claims(conn, queue, calls, 1)
        ten = await _time_claims(conn, queue, max(3, calls // 5), 10)
    finally:
        await conn.close()
    return {
        "rows": rows,
        "shape": shape,
        "load_seconds": round(load_s, 2),
        "explain": explain,
        "limit_1": one,
        "limit_10": ten,
    }


async def _explain_rolled_back(conn: asyncpg.Connection, worker_id: uuid.UUID) -> dict[str, Any]:
    tr = conn.transaction()
    await tr.start()
    try:
        orphans = [row["backend"] for row in await conn.fetch(sql("unserved_backends"))]
        plan = await conn.fetchval(
            "EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) " + sql("claim"),
            *(worker_id, "mock", True, orphans, 1, 30.0, 0.0, [], None),
        )
    finally:
        await tr.rollback()
    top = plan[0] if isinstance(plan, list) else plan
    return {"execution_ms": round(top["Execution Time"], 3), "planning_ms": round(top["Planning Time"], 3)}


async def run(sizes: tuple[int, ...] = (0, 100_000, 1_000_000), calls: int = 200) -> dict[str, Any]:
    info = await machine_info()
    results = []
    async with scratch_database("bench_backlog") as dsn:
        for rows in sizes:
            result = await measure(dsn, rows, "runnable", calls)
            results.append(result)
            print(f"  {rows:>9,} runnable rows: claim p50 {result['limit_1']['p50_ms']} ms", flush=True)
        for rows in sizes:
            if rows == 0:
                continue
            foreign_calls = 20 if rows <= 100_000 else 5
            result = await measure(dsn, rows, "foreign", foreign_calls)
            results.append(result)
            print(f"  {rows:>9,} other-backend rows: claim p50 {result['limit_1']['p50_ms']} ms", flush=True)
        for rows in sizes:
            if rows == 0:
                continue
            result = await measure(dsn, rows, "one owner", calls)
            results.append(result)
            print(f"  {rows:>9,} rows of one owner: claim p50 {result['limit_1']['p50_ms']} ms", flush=True)
    print_table(
        "Claim statement latency vs backlog (statement round trip; commit apart; EXPLAIN ANALYZE = server)",
        [
            "pending rows",
            "shape",
            "load s",
            "explain ms",
            "n",
            "p50 ms",
            "p95 ms",
            "p99 ms",
            "p50 (10/claim)",
            "commit p50",
            "orphan check p50",
        ],
        [
            (
                f"{r['rows']:,}",
                r["shape"],
                r["load_seconds"],
                r["explain"]["execution_ms"],
                r["limit_1"]["n"],
                r["limit_1"]["p50_ms"],
                r["limit_1"]["p95_ms"],
                r["limit_1"]["p99_ms"],
                r["limit_10"]["p50_ms"],
                r["limit_1"]["commit"]["p50_ms"],
                r["limit_1"]["orphan_check"]["p50_ms"],
            )
            for r in results
        ],
    )
    out = {"machine": info, "parameters": {"sizes": list(sizes), "calls": calls}, "results": results}
    write_result(NAME, out)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[0, 100_000, 1_000_000])
    parser.add_argument("--calls", type=int, default=200)
    args = parser.parse_args()
    asyncio.run(run(tuple(args.sizes), args.calls))


if __name__ == "__main__":
    main()
