"""Fairness: the claim's cost with a large backlog over many owners, and how long one owner's
single job waits behind another owner's burst.

Claim cost: a scratch database is loaded with ``--rows`` pending rows spread over ``--owners``
owners in one ``INSERT ... SELECT`` through the real insert trigger (imagen.jobs_take_turn,
which gives each row its turn), and ``VACUUM ANALYZE``'d. The real claim statement
(``Queue.claim``, asyncpg over TCP, one row per call, each call in its own transaction that
is committed) is timed from the client, without and with ``worker.max_running_per_owner``.
One web insert (as ``authenticated``, with a live-job limit set, so the quota check runs
too) is timed the same way.

Starvation: owner A queues 1,000 jobs in one statement; a real ``imagen-worker run`` process
(mock backend, fixed job duration) starts on them; then owner B queues one job. B's wait is
``started_at - created_at`` of its row, reported in milliseconds and in job durations, next to
how many jobs were ahead of it in plain age order.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
import uuid
from pathlib import Path
from typing import Any

import asyncpg

from bench.common import (
    machine_info,
    print_table,
    scratch_database,
    scratch_directory,
    spawn_worker,
    stop_worker,
    summary_ms,
    wait_for_workers,
    worker_env,
    write_result,
    write_worker_config,
)
from imagen_worker.db.connect import connect
from imagen_worker.queue.jobs import Queue

NAME = "fairness"

LOAD = """
INSERT INTO imagen.jobs (owner_user_id, prompt, width, height, run_at, created_at)
SELECT ('00000000-0000-4000-8000-' || lpad(to_hex(g % $2), 12, '0'))::uuid,
       'fair job number ' || g || ', a lighthouse at dusk', 512, 512,
       now() - make_interval(secs => $1 - g), now() - make_interval(secs => $1 - g)
FROM generate_series(1, $1) AS g
"""

WEB_INSERT = (
    "INSERT INTO imagen.jobs (owner_user_id, prompt, width, height) VALUES ($1, 'one more', 512, 512)"
)


async def _time_claims(conn: asyncpg.Connection, calls: int, per_owner: int | None) -> dict[str, Any]:
    queue = Queue(conn, uuid.uuid4())
    durations = []
    for _ in range(calls):
        tr = conn.transaction()
        await tr.start()
        t0 = time.perf_counter()
        await queue.claim("mock", is_default=True, limit=1, lease_seconds=30, max_running_per_owner=per_owner)
        durations.append(time.perf_counter() - t0)
        await tr.commit()
    return summary_ms(durations)


async def _time_web_inserts(conn: asyncpg.Connection, calls: int, owners: int) -> dict[str, Any]:
    await conn.execute("UPDATE imagen.settings SET max_live_jobs_per_owner = 1000000")
    durations = []
    for i in range(calls):
        owner = uuid.UUID(f"00000000-0000-4000-8000-{i % owners:012x}")
        async with conn.transaction():
            await conn.execute("SET LOCAL ROLE authenticated")
            await conn.execute(
                "SELECT set_config('request.jwt.claims', $1, true)", json.dumps({"sub": str(owner)})
            )
            t0 = time.perf_counter()
            await conn.execute(WEB_INSERT, owner)
            durations.append(time.perf_counter() - t0)
    await conn.execute("UPDATE imagen.settings SET max_live_jobs_per_owner = NULL")
    return summary_ms(durations)


async def claim_cost(dsn: str, rows: int, owners: int, calls: int) -> dict[str, Any]:
    conn = await connect(dsn)
    try:
        started = time.monotonic()
        await conn.execute(LOAD, rows, owners)
        await conn.execute("VACUUM ANALYZE imagen.jobs")
        load_s = time.monotonic() - started
        plain = await _time_claims(conn, calls, None)
        limited = await _time_claims(conn, calls, 2)
        inserts = await _time_web_inserts(conn, calls, owners)
    finally:
        await conn.close()
    return {
        "rows": rows,
        "owners": owners,
        "load_seconds": round(load_s, 1),
        "claim": plain,
        "claim_max_running_2": limited,
        "web_insert": inserts,
    }


async def starvation(dsn: str, backlog: int, concurrency: int, job_ms: int, workdir: Path) -> dict[str, Any]:
    a, b = uuid.uuid4(), uuid.uuid4()
    conn = await connect(dsn)
    proc = None
    try:
        await conn.execute("TRUNCATE imagen.jobs, imagen.images, imagen.workers CASCADE")
        await conn.execute(
            "INSERT INTO imagen.jobs (owner_user_id, prompt, width, height)"
            " SELECT $1, 'burst ' || g, 64, 64 FROM generate_series(1, $2) g",
            a,
            backlog,
        )
        config = write_worker_config(
            workdir / f"c{concurrency}",
            backends={"mock": {"type": "mock", "latency_ms": job_ms}},
            worker={"concurrency": concurrency, "poll_interval": 1.0},
        )
        proc = spawn_worker(worker_env(dsn, config), workdir / f"c{concurrency}" / "worker.log")
        await wait_for_workers(conn, 1)
        while await conn.fetchval("SELECT count(*) FROM imagen.jobs WHERE status <> 'pending'") < concurrency:
            await asyncio.sleep(0.01)
        await asyncio.sleep(job_ms / 2000)  # B arrives mid-job
        b_id = await conn.fetchval(
            "INSERT INTO imagen.jobs (owner_user_id, prompt, width, height) VALUES ($1, 'single', 64, 64)"
            " RETURNING id",
            b,
        )
        ahead = await conn.fetchval(
            "SELECT count(*) FROM imagen.jobs WHERE status = 'pending' AND id <> $1", b_id
        )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            row = await conn.fetchrow(
                "SELECT extract(epoch FROM started_at - created_at)::float8 AS waited FROM imagen.jobs"
                " WHERE id = $1 AND started_at IS NOT NULL",
                b_id,
            )
            if row is not None:
                break
            await asyncio.sleep(0.01)
        else:
            raise TimeoutError("B's job never started")
        a_started = await conn.fetchval(
            "SELECT count(*) FROM imagen.jobs WHERE owner_user_id = $1 AND started_at IS NOT NULL", a
        )
    finally:
        if proc is not None:
            stop_worker(proc, timeout=5)
        await conn.close()
    waited_ms = row["waited"] * 1000
    return {
        "backlog": backlog,
        "concurrency": concurrency,
        "job_ms": job_ms,
        "b_waited_ms": round(waited_ms, 1),
        "b_waited_jobs": round(waited_ms / job_ms, 2),
        "a_jobs_started_before_b": a_started,
        "ahead_in_age_order": ahead,
        "fifo_wait_ms_estimate": round(ahead * job_ms / concurrency, 1),
    }


async def run(
    rows: int = 1_000_000, owners: int = 10_000, calls: int = 200, backlog: int = 1000, job_ms: int = 200
) -> dict[str, Any]:
    info = await machine_info()
    async with scratch_database("bench_fair") as dsn:
        cost = await claim_cost(dsn, rows, owners, calls)
        print(
            f"  {rows:,} pending rows over {owners:,} owners: claim p50 {cost['claim']['p50_ms']} ms",
            flush=True,
        )
        with scratch_directory("imagen-fair-") as tmp:
            waits = [await starvation(dsn, backlog, c, job_ms, tmp) for c in (1, 4)]
    print_table(
        "Claim and web insert latency with a backlog over many owners (statement round trip)",
        ["pending rows", "owners", "load s", "claim p50", "claim p95", "claim p50 (max 2 running/owner)",
         "web insert p50", "web insert p95"],
        [(f"{rows:,}", f"{owners:,}", cost["load_seconds"], cost["claim"]["p50_ms"], cost["claim"]["p95_ms"],
          cost["claim_max_running_2"]["p50_ms"], cost["web_insert"]["p50_ms"], cost["web_insert"]["p95_ms"])],
    )  # fmt: skip
    print_table(
        f"Starvation: owner A queues {backlog:,} jobs first, then owner B queues one (job = {job_ms} ms)",
        ["concurrency", "B waited ms", "B waited (jobs)", "A jobs started first", "ahead in age order",
         "age order would wait ms"],
        [(w["concurrency"], w["b_waited_ms"], w["b_waited_jobs"], w["a_jobs_started_before_b"],
          w["ahead_in_age_order"], w["fifo_wait_ms_estimate"]) for w in waits],
    )  # fmt: skip
    out = {
        "machine": info,
        "parameters": {"rows": rows, "owners": owners, "calls": calls, "backlog": backlog, "job_ms": job_ms},
        "claim_cost": cost,
        "starvation": waits,
    }
    write_result(NAME, out)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--owners", type=int, default=10_000)
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--backlog", type=int, default=1000)
    parser.add_argument("--job-ms", type=int, default=200)
    args = parser.parse_args()
    asyncio.run(run(args.rows, args.owners, args.calls, args.backlog, args.job_ms))


if __name__ == "__main__":
    main()
