"""Throughput: jobs/s burning down a pre-started queue, imagen-worker vs pgqueuer vs procrastinate.

Every system runs in K worker *processes* (1 and 4) on the same PostgreSQL, each in its own
scratch database. The workers start first and report ready; then N jobs are enqueued in one
batch with each system's own batch API and the clock runs from the enqueue's commit until the
last job is recorded as finished (polled every 20 ms). What each system does per job:

* ``imagen end-to-end`` (``imagen-worker run`` subprocesses, mock backend with 0 ms latency,
  64x64 images, local storage): a batched claim (UPDATE ... RETURNING, up to free capacity),
  the pipeline (render a tiny PNG in a thread, write the image, its JSON sidecar and a journal
  file, each fsync'ed and renamed), then one transaction that INSERTs the ``imagen.images``
  row and UPDATEs the job to ``done``, plus heartbeats; two NOTIFYs per job from the status
  trigger (running, done). Concurrency 16 per process.
* ``imagen queue only`` (``Queue`` API, no files): the same claim and the same images-row +
  done transaction, nothing else; 16 jobs in flight per process. This is the queue's cost
  without the image pipeline, the like-for-like number for the comparison.
* ``pgqueuer`` (``QueueManager`` over an ``AsyncpgDriver``, default durable tables, batch_size
  10): batched dequeue (UPDATE to ``picked``), a no-op async entrypoint, completion buffered and
  flushed in batches (DELETE from the queue + INSERT into ``pgqueuer_log``), heartbeats; a
  statement-level NOTIFY trigger on every change of its queue table.
* ``procrastinate`` (``App`` + ``PsycopgConnector``, psycopg 3; there is no asyncpg connector
  in procrastinate 3): one job per fetch (``procrastinate_fetch_job_v2``), a no-op async task,
  one finish call per job (status ``succeeded``, rows kept, events written by triggers);
  LISTEN/NOTIFY on, concurrency 16 per process.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg

from bench.common import (
    ROOT,
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

NAME = "throughput"
CONCURRENCY = 16


# --- worker processes for each system ------------------------------------------------------


async def _imagen_queue_worker(dsn: str) -> None:
    from imagen_worker.db.connect import create_pool
    from imagen_worker.queue.jobs import ImageRecord, Job, Queue

    pool = await create_pool(dsn, min_size=4, max_size=CONCURRENCY + 2)
    queue = Queue(pool, uuid.uuid4())
    await queue.register("bench", os.getpid(), ["mock"], 60)
    inflight: set[asyncio.Task[Any]] = set()

    async def finish(job: Job) -> None:
        record = ImageRecord(
            storage_path=f"bench/{job.id}.png", mime_type="image/png", bytes=0, sha256="0" * 64,
            backend="mock", seed=1, latency_ms=0, sidecar={},
        )  # fmt: skip
        await queue.complete(job, record)

    print("READY", flush=True)
    while True:
        free = CONCURRENCY - len(inflight)
        jobs = await queue.claim("mock", is_default=True, limit=free, lease_seconds=30) if free else []
        for job in jobs:
            task = asyncio.create_task(finish(job))
            inflight.add(task)
            task.add_done_callback(inflight.discard)
        if not jobs:
            await asyncio.sleep(0.002 if inflight else 0.01)


def _procrastinate_app(dsn: str) -> Any:
    import procrastinate

    app = procrastinate.App(connector=procrastinate.PsycopgConnector(conninfo=dsn))

    @app.task(name="noop")
    async def noop() -> None:
        return None

    return app


async def _procrastinate_worker(dsn: str) -> None:
    app = _procrastinate_app(dsn)
    async with app.open_async():
        print("READY", flush=True)
        await app.run_worker_async(concurrency=CONCURRENCY, wait=True, install_signal_handlers=True)


async def _pgqueuer_worker(dsn: str) -> None:
    from pgqueuer import Queries
    from pgqueuer.db import AsyncpgDriver
    from pgqueuer.models import Job
    from pgqueuer.qm import QueueManager

    conn = await asyncpg.connect(dsn)
    qm = QueueManager(Queries(AsyncpgDriver(conn)))

    @qm.entrypoint("noop")
    async def noop(job: Job) -> None:
        return None

    print("READY", flush=True)
    await qm.run(batch_size=10)


WORKERS: dict[str, Callable[[str], Awaitable[None]]] = {
    "imagen-queue": _imagen_queue_worker,
    "pgqueuer": _pgqueuer_worker,
    "procrastinate": _procrastinate_worker,
}


def _spawn_python_worker(kind: str, dsn: str, log: Path) -> subprocess.Popen[bytes]:
    code = "from bench.throughput import main; main()"
    cmd = [sys.executable, "-c", code, "--worker", kind, "--dsn", dsn]
    return subprocess.Popen(
        cmd,
        cwd=str(ROOT),
        stdout=subprocess.PIPE,
        stderr=open(log, "ab"),
        start_new_session=True,
    )


def _wait_ready(procs: list[subprocess.Popen[bytes]], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    for proc in procs:
        assert proc.stdout is not None
        while True:
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError(f"worker {proc.args} did not become ready (exit {proc.returncode})")
            if proc.stdout.readline().strip() == b"READY":
                break


# --- one measurement -----------------------------------------------------------------------


async def _poll(done: Callable[[], Awaitable[bool]], timeout: float) -> float:
    started = time.monotonic()
    while not await done():
        if time.monotonic() - started > timeout:
            raise TimeoutError(f"not finished within {timeout}s")
        await asyncio.sleep(0.02)
    return time.monotonic() - started


async def measure(system: str, processes: int, jobs: int, workdir: Path) -> dict[str, Any]:
    async with scratch_database(
        f"bench_tp_{system.replace('-', '_')}", migrated=system.startswith("imagen")
    ) as dsn:
        conn = await asyncpg.connect(dsn)
        procs: list[subprocess.Popen[bytes]] = []
        log = workdir / f"{system}-{processes}.log"
        try:
            if system == "pgqueuer":
                from pgqueuer import Queries
                from pgqueuer.db import AsyncpgDriver

                await Queries(AsyncpgDriver(conn)).install()
            elif system == "procrastinate":
                app = _procrastinate_app(dsn)
                async with app.open_async():
                    await app.schema_manager.apply_schema_async()

            if system == "imagen":
                config = write_worker_config(
                    workdir / f"imagen-{processes}",
                    backends={"mock": {"type": "mock", "latency_ms": 0, "capacity": CONCURRENCY}},
                    worker={"concurrency": CONCURRENCY, "poll_interval": 5.0},
                )
                env = worker_env(dsn, config)
                procs = [spawn_worker(env, log) for _ in range(processes)]
                await wait_for_workers(conn, processes, timeout=60)
            else:
                procs = [_spawn_python_worker(system, dsn, log) for _ in range(processes)]
                await asyncio.get_running_loop().run_in_executor(None, _wait_ready, procs)
            await asyncio.sleep(1.5)  # let every process finish LISTEN and its first (empty) poll

            t0 = time.monotonic()
            if system.startswith("imagen"):
                await insert_jobs(conn, jobs)

                async def finished() -> bool:
                    return bool(
                        await conn.fetchval("SELECT count(*) FROM imagen.jobs WHERE status = 'done'") >= jobs
                    )
            elif system == "pgqueuer":
                from pgqueuer import Queries
                from pgqueuer.db import AsyncpgDriver

                await Queries(AsyncpgDriver(conn)).enqueue(["noop"] * jobs, [None] * jobs, [0] * jobs)

                async def finished() -> bool:
                    return bool(await conn.fetchval("SELECT count(*) FROM pgqueuer") == 0)
            else:
                app = _procrastinate_app(dsn)
                async with app.open_async():
                    await app.tasks["noop"].batch_defer_async(*({} for _ in range(jobs)))

                async def finished() -> bool:
                    return bool(
                        await conn.fetchval(
                            "SELECT count(*) FROM procrastinate_jobs WHERE status = 'succeeded'"
                        )
                        >= jobs
                    )

            enqueued = time.monotonic() - t0
            elapsed = await _poll(finished, timeout=max(120.0, jobs / 20))
            if system.startswith("imagen"):
                bad = await conn.fetchval("SELECT count(*) FROM imagen.jobs WHERE status <> 'done'")
                images = await conn.fetchval("SELECT count(*) FROM imagen.images")
                assert bad == 0 and images == jobs, (bad, images)
        finally:
            for proc in procs:
                stop_worker(proc, timeout=20)
                if proc.stdout is not None:
                    proc.stdout.close()
            await conn.close()
    return {
        "system": system,
        "processes": processes,
        "jobs": jobs,
        "enqueue_seconds": round(enqueued, 3),
        "seconds": round(elapsed, 3),
        "jobs_per_second": round(jobs / elapsed, 1),
    }


async def run(jobs: int = 4000, imagen_jobs: int | None = None) -> dict[str, Any]:
    info = await machine_info()
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="imagen-bench-tp-") as tmp:
        for system in ("imagen", "imagen-queue", "pgqueuer", "procrastinate"):
            for processes in (1, 4):
                n = imagen_jobs or jobs if system == "imagen" else jobs
                result = await measure(system, processes, n, Path(tmp))
                results.append(result)
                print(f"  {system:14s} x{processes}: {result['jobs_per_second']:>9,.1f} jobs/s", flush=True)
    by = {(r["system"], r["processes"]): r["jobs_per_second"] for r in results}
    rows = []
    for r in results:
        base = by[("imagen", r["processes"])]
        queue_base = by[("imagen-queue", r["processes"])]
        rows.append((
            r["system"], r["processes"], r["jobs"], r["seconds"], r["jobs_per_second"],
            round(r["jobs_per_second"] / base, 2), round(r["jobs_per_second"] / queue_base, 2),
        ))  # fmt: skip
    print_table(
        "Throughput (burn-down of a pre-enqueued batch; ratios: this system / imagen)",
        ["system", "procs", "jobs", "seconds", "jobs/s", "x imagen e2e", "x imagen queue"],
        rows,
    )
    result = {
        "machine": info,
        "parameters": {"jobs": jobs, "concurrency_per_process": CONCURRENCY},
        "versions": _versions(),
        "runs": results,
        "recorded": datetime.now(UTC).isoformat(),
    }
    write_result(NAME, result)
    return result


def _versions() -> dict[str, str]:
    from importlib.metadata import version

    out = {}
    for package in ("imagen-worker", "pgqueuer", "procrastinate", "asyncpg", "psycopg"):
        with contextlib.suppress(Exception):
            out[package] = version(package)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=4000)
    parser.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    parser.add_argument("--dsn", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(WORKERS[args.worker](args.dsn))
        return
    asyncio.run(run(args.jobs))


if __name__ == "__main__":
    main()
