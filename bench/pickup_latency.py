"""Pickup latency: INSERT commit -> the job is claimed by a worker, and the physical floor.

What is measured
----------------
* ``pickup``: a client INSERTs one job the way the web UI does (one autocommit statement over
  asyncpg/TCP) and takes ``t_commit`` = ``time.monotonic()`` when the server's acknowledgement
  of the commit arrives. A real in-process ``Worker`` runs in a separate process (so the two
  never share an event loop or the GIL); its ``claimed`` hook takes ``t_claim`` =
  ``time.monotonic()`` when the claim statement has returned the row to the worker. Pickup is
  ``t_claim - t_commit`` (CLOCK_MONOTONIC is system-wide on Linux, so the two processes'
  clocks agree). Jobs are sent one at a time: the next INSERT happens only after the previous
  job is done, so every job meets an idle worker. The server-side view is reported as well:
  ``waited_seconds`` = the claim transaction's ``now()`` minus the INSERT's ``now()``.
* ``behind a backlog`` (10,000 rows that the claim must plan around, two kinds):
  - ``future``: 10,000 pending rows with ``run_at`` one hour ahead (delayed jobs);
  - ``foreign``: 10,000 pending, runnable rows, *older* than the probe jobs, for a backend
    (``other-gpu``) that another live worker serves; this worker's claim must skip all of them
    on every claim (they sort first in the claim index).
* the floor, over the same kind of connection (asyncpg over TCP to 127.0.0.1):
  - ``SELECT 1`` round trip;
  - ``NOTIFY`` round trip: connection B runs ``SELECT pg_notify(...)`` (autocommit), connection
    A is LISTENing; time from B's call to A's callback;
  - ``INSERT -> NOTIFY``: B inserts a job row, A listens on ``imagen_jobs``; time from the
    INSERT call to the trigger's notification arriving (no worker running).
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import os
import time
import uuid
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import asyncpg

from bench.common import (
    machine_info,
    print_table,
    scratch_database,
    scratch_directory,
    summary_ms,
    write_result,
    write_worker_config,
)

NAME = "pickup_latency"
INSERT_ONE = (
    "INSERT INTO imagen.jobs (owner_user_id, prompt, width, height) VALUES ($1, $2, 64, 64) RETURNING id"
)


# --- the worker process --------------------------------------------------------------------


def _worker_process(dsn: str, config_path: str, pipe: Connection) -> None:
    os.environ["IMAGEN_CONFIG"] = config_path
    os.environ["IMAGEN_CLOUD_SYNC"] = "off"
    asyncio.run(_run_worker(dsn, pipe))


async def _run_worker(dsn: str, pipe: Connection) -> None:
    import structlog

    from imagen_worker.config import load_config
    from imagen_worker.worker.daemon import Worker

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(40))
    worker = Worker(load_config(), dsn, run_migrations=False)

    def hook(event: str, data: dict[str, Any]) -> None:
        if event == "claimed":
            job = data["job"]
            pipe.send(("claimed", str(job.id), time.monotonic(), job.waited_seconds))
        elif event in ("done", "failed"):
            pipe.send((event, str(data["job"].id), time.monotonic(), 0.0))

    worker.hooks.append(hook)
    task = asyncio.create_task(worker.run())
    await worker.ready.wait()
    pipe.send(("ready", "", time.monotonic(), 0.0))
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, pipe.recv)  # the parent's "stop"
    worker.request_stop()
    await task
    pipe.send(("stopped", "", time.monotonic(), 0.0))


# --- measurements --------------------------------------------------------------------------


async def floor(dsn: str, samples: int) -> dict[str, Any]:
    a = await asyncpg.connect(dsn)
    b = await asyncpg.connect(dsn)
    try:
        for _ in range(50):
            await b.fetchval("SELECT 1")
        select1 = []
        for _ in range(samples):
            t0 = time.perf_counter()
            await b.fetchval("SELECT 1")
            select1.append(time.perf_counter() - t0)

        arrived: asyncio.Queue[float] = asyncio.Queue()
        await a.add_listener("bench_floor", lambda *_: arrived.put_nowait(time.perf_counter()))
        await a.add_listener("imagen_jobs", lambda *_: arrived.put_nowait(time.perf_counter()))
        notify = []
        for i in range(samples + 50):
            t0 = time.perf_counter()
            await b.execute("SELECT pg_notify('bench_floor', $1)", str(i))
            t1 = await asyncio.wait_for(arrived.get(), 5)
            if i >= 50:
                notify.append(t1 - t0)
        owner = uuid.uuid4()
        insert_notify = []
        for i in range(samples + 50):
            t0 = time.perf_counter()
            await b.fetchval(INSERT_ONE, owner, f"floor {i}")
            t1 = await asyncio.wait_for(arrived.get(), 5)
            if i >= 50:
                insert_notify.append(t1 - t0)
        await b.execute("TRUNCATE imagen.jobs CASCADE")
    finally:
        await a.close()
        await b.close()
    return {
        "select_1": summary_ms(select1),
        "notify_roundtrip": summary_ms(notify),
        "insert_to_notify": summary_ms(insert_notify),
    }


async def _prepare_backlog(conn: asyncpg.Connection, kind: str, rows: int) -> None:
    if kind == "future":
        await conn.execute(
            """INSERT INTO imagen.jobs (owner_user_id, prompt, width, height, run_at)
               SELECT gen_random_uuid(), 'delayed ' || g, 64, 64, now() + interval '1 hour'
               FROM generate_series(1, $1) g""",
            rows,
        )
    elif kind == "foreign":
        await conn.execute(
            """INSERT INTO imagen.workers (id, hostname, pid, backends, expires_at)
               VALUES (gen_random_uuid(), 'bench-other-host', 1, ARRAY['other-gpu'],
                       now() + interval '1 day')"""
        )
        await conn.execute(
            """INSERT INTO imagen.jobs (owner_user_id, prompt, backend, width, height, run_at)
               SELECT gen_random_uuid(), 'foreign ' || g, 'other-gpu', 64, 64, now() - interval '1 minute'
               FROM generate_series(1, $1) g""",
            rows,
        )
    await conn.execute("VACUUM ANALYZE imagen.jobs")


async def pickup(
    dsn: str, workdir: Path, jobs: int, backlog_kind: str | None, backlog_rows: int
) -> dict[str, Any]:
    config_path = write_worker_config(
        workdir / (backlog_kind or "idle"),
        backends={"mock": {"type": "mock", "latency_ms": 0, "capacity": 4}},
        worker={"concurrency": 4, "poll_interval": 5.0},
    )
    conn = await asyncpg.connect(dsn)
    ctx = mp.get_context("spawn")
    parent_end, child_end = ctx.Pipe()
    proc = ctx.Process(target=_worker_process, args=(dsn, str(config_path), child_end), daemon=True)
    try:
        await conn.execute("TRUNCATE imagen.jobs, imagen.images, imagen.workers CASCADE")
        if backlog_kind:
            await _prepare_backlog(conn, backlog_kind, backlog_rows)
        proc.start()
        loop = asyncio.get_running_loop()

        async def receive() -> tuple[str, str, float, float]:
            if not await loop.run_in_executor(None, parent_end.poll, 30):
                raise TimeoutError("the worker process stopped answering")
            message: tuple[str, str, float, float] = parent_end.recv()
            return message

        kind, *_ = await receive()
        assert kind == "ready", kind
        await asyncio.sleep(0.5)
        owner = uuid.uuid4()
        pickups: list[float] = []
        waited: list[float] = []
        for i in range(jobs + 20):
            job_id = str(await conn.fetchval(INSERT_ONE, owner, f"pickup probe {i}"))
            t_commit = time.monotonic()
            claimed_at = None
            while True:
                kind, got, at, wait_s = await receive()
                if got != job_id:
                    continue
                if kind == "claimed":
                    claimed_at = at
                    if i >= 20:  # the first few warm up prepared statements and caches
                        pickups.append(at - t_commit)
                        waited.append(wait_s)
                elif kind in ("done", "failed"):
                    assert claimed_at is not None
                    break
            await asyncio.sleep(0.002)
        parent_end.send("stop")
        while (await receive())[0] != "stopped":
            pass
    finally:
        if proc.is_alive():
            proc.join(timeout=20)
        if proc.is_alive():
            proc.kill()
            proc.join()
        await conn.close()
    return {"pickup": summary_ms(pickups), "server_waited": summary_ms(waited)}


async def run(jobs: int = 1000, backlog_rows: int = 10_000, floor_samples: int = 1000) -> dict[str, Any]:
    async with scratch_database("bench_pickup") as dsn:
        info = await machine_info()
        floors = await floor(dsn, floor_samples)
        with scratch_directory("imagen-bench-pickup-") as tmp:
            scenarios = {
                "idle": await pickup(dsn, tmp, jobs, None, 0),
                "backlog_future": await pickup(dsn, tmp, jobs, "future", backlog_rows),
                "backlog_foreign": await pickup(dsn, tmp, jobs, "foreign", backlog_rows),
            }
    rows = [
        ("floor: SELECT 1 round trip", floors["select_1"]),
        ("floor: NOTIFY round trip (2 conns)", floors["notify_roundtrip"]),
        ("floor: INSERT -> trigger NOTIFY", floors["insert_to_notify"]),
    ]
    labels = {
        "idle": "idle queue",
        "backlog_future": f"behind {backlog_rows:,} delayed rows",
        "backlog_foreign": f"behind {backlog_rows:,} other-backend rows",
    }
    for key, label in labels.items():
        rows.append((f"pickup: {label}", scenarios[key]["pickup"]))
        rows.append(("  server view (claim now() - insert now())", scenarios[key]["server_waited"]))
    print_table(
        f"Pickup latency ({jobs} jobs per scenario, one at a time; floor over {floor_samples} samples)",
        ["measurement", "n", "p50 ms", "p95 ms", "p99 ms", "mean ms", "max ms"],
        [
            (label, s["n"], s["p50_ms"], s["p95_ms"], s["p99_ms"], s["mean_ms"], s["max_ms"])
            for label, s in rows
        ],
    )
    result = {
        "machine": info,
        "parameters": {"jobs": jobs, "backlog_rows": backlog_rows, "floor_samples": floor_samples},
        "floor": floors,
        "scenarios": scenarios,
    }
    write_result(NAME, result)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=1000)
    parser.add_argument("--backlog", type=int, default=10_000)
    parser.add_argument("--floor-samples", type=int, default=1000)
    args = parser.parse_args()
    asyncio.run(run(args.jobs, args.backlog, args.floor_samples))


if __name__ == "__main__":
    main()
