"""Throughput: jobs/s burning down a pre-started queue, imagen-worker vs pgqueuer vs procrastinate.

Every system runs in K worker *processes* (1 and 4) on the same PostgreSQL, each in its own
scratch database. The workers start first and report ready; then N jobs are enqueued in one
batch with each system's own batch API and the clock runs from the enqueue's commit until the
last job is recorded as finished (polled every 20 ms). What each system does per job:

* ``imagen end-to-end`` (``imagen-worker run`` subprocesses, mock backend with 0 ms latency,
  64x64 images, local storage, default output settings): a batched claim (UPDATE ...
  RETURNING, up to free capacity), the pipeline (render a tiny PNG in a thread; in one more
  thread hop its metadata chunks, the image fsync'ed with its directory, a 256 px WebP
  thumbnail, the JSON sidecar and a journal file (renamed, not fsync'ed)), then the
  completion: the ``imagen.images`` row and ``done``, batched with the jobs finishing at the
  same moment into one fenced statement and one commit, plus heartbeats; two NOTIFYs per job
  from the status trigger (running, done). No upload record (local storage keeps the files
  on this host) and no progress write (the job is over before its first one is due).
  Concurrency 16 per process; a job whose outcome is being written frees its slot.
* ``imagen lean`` (the same, with the files an operator may switch off switched off:
  ``output.thumbnail_size: 0`` and ``output.write_metadata_json: false``): the image, fsync'ed
  with its directory, and the journal are all a job writes on disk. With ``imagen`` and
  ``imagen queue only`` (no files at all) it tells what the local files cost.
* ``imagen queue only`` (``Queue`` API, no files): the same claim and the same batched
  images-row + done completion, nothing else; 16 jobs working per process, slots freed at
  the hand-off to the completion batch as in the daemon. This is the queue's cost without
  the image pipeline, the like-for-like number for pgqueuer's no-op.
* ``pgqueuer`` (``QueueManager`` over an ``AsyncpgDriver``, default durable tables, batch_size
  10): batched dequeue (UPDATE to ``picked``), a no-op async entrypoint, completion buffered and
  flushed in batches (DELETE from the queue + INSERT into ``pgqueuer_log``), heartbeats; a
  statement-level NOTIFY trigger on every change of its queue table.
* ``procrastinate`` (``App`` + ``PsycopgConnector``, psycopg 3; there is no asyncpg connector
  in procrastinate 3): one job per fetch (``procrastinate_fetch_job_v2``), a no-op async task,
  one finish call per job (status ``succeeded``, rows kept, events written by triggers);
  LISTEN/NOTIFY on, concurrency 16 per process.
* ``pgqueuer + result`` and ``procrastinate + result``: the same, but every task writes a
  result row like our images row (storage path, sha256, a JSON sidecar) with one INSERT on its
  own asyncpg pool. Neither library lets a task write in the transaction that completes its
  job, so this is one extra transaction per job; imagen writes its row in the completing one.
  With and without, the table separates what the queue costs from what the work costs.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, Coroutine
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from uuid import UUID

import asyncpg

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

NAME = "throughput"
CONCURRENCY = 16


# --- worker processes for each system ------------------------------------------------------


async def _imagen_queue_worker(dsn: str) -> None:
    from imagen_worker.db.connect import create_pool
    from imagen_worker.queue.batch import CompletionBatcher
    from imagen_worker.queue.jobs import ImageRecord, Job, Queue

    pool = await create_pool(dsn, min_size=4, max_size=CONCURRENCY + 2, full_reset=False)
    queue = Queue(pool, uuid.uuid4())
    completions = CompletionBatcher(queue)
    await queue.register("bench", os.getpid(), ["mock"], 60)
    inflight: set[asyncio.Task[Any]] = set()
    working: set[UUID] = set()  # claimed and not yet handed to the batcher: these hold a slot

    async def finish(job: Job) -> None:
        record = ImageRecord(
            storage_path=f"bench/{job.id}.png", mime_type="image/png", bytes=0, sha256="0" * 64,
            backend="mock", seed=1, latency_ms=0, sidecar={},
        )  # fmt: skip
        # Like the daemon: a job whose outcome is being written frees its slot.
        working.discard(job.id)
        freed.set()
        await completions.complete(job, record)

    freed = asyncio.Event()

    def finished(task: asyncio.Task[Any]) -> None:
        inflight.discard(task)
        freed.set()

    print("READY", flush=True)
    while True:
        free = min(CONCURRENCY - len(working), 2 * CONCURRENCY - len(inflight))
        jobs = await queue.claim("mock", is_default=True, limit=free, lease_seconds=30) if free else []
        for job in jobs:
            working.add(job.id)
            task = asyncio.create_task(finish(job))
            inflight.add(task)
            task.add_done_callback(finished)
        if not jobs:
            # Like the daemon: claim again when a job finishes (or, idle, at a short poll).
            freed.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(None if inflight else 0.01):
                    await freed.wait()


# Whether a system still has work, polled while the clock runs. Each stops at the first live
# row; counting finished rows instead reads the whole table at every poll, and ours and
# procrastinate's keep their rows, so that count grew with the run and slowed them alone.
IMAGEN_LIVE = "SELECT EXISTS (SELECT 1 FROM imagen.jobs WHERE status IN ('pending', 'running'))"
PGQUEUER_LIVE = "SELECT EXISTS (SELECT 1 FROM pgqueuer)"
PROCRASTINATE_LIVE = "SELECT EXISTS (SELECT 1 FROM procrastinate_jobs WHERE status IN ('todo', 'doing'))"

RESULTS_TABLE = """
CREATE TABLE IF NOT EXISTS bench_results (
    id           bigserial PRIMARY KEY,
    job_id       text NOT NULL,
    storage_path text NOT NULL UNIQUE,
    sha256       text NOT NULL,
    sidecar      jsonb NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now()
)
"""
INSERT_RESULT = "INSERT INTO bench_results (job_id, storage_path, sha256, sidecar) VALUES ($1, $2, $3, $4)"


class _ResultWriter:
    """The per-job work of the ``+ result`` variants: one result row, like our images row."""

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        self.pool: asyncpg.Pool | None = None

    async def open(self) -> None:
        self.pool = await asyncpg.create_pool(self.dsn, min_size=2, max_size=CONCURRENCY)

    async def write(self, job_id: str) -> None:
        assert self.pool is not None
        sidecar = '{"backend": "mock", "seed": 1, "width": 64, "height": 64}'
        await self.pool.execute(INSERT_RESULT, job_id, f"bench/{job_id}.png", "0" * 64, sidecar)


def _procrastinate_app(dsn: str, results: _ResultWriter | None = None) -> Any:
    import procrastinate

    app = procrastinate.App(connector=procrastinate.PsycopgConnector(conninfo=dsn))

    @app.task(name="noop", pass_context=True)
    async def noop(context: Any) -> None:
        if results is not None:
            await results.write(str(context.job.id))

    return app


async def _procrastinate_worker(dsn: str, with_result: bool = False) -> None:
    results = _ResultWriter(dsn) if with_result else None
    if results is not None:
        await results.open()
    app = _procrastinate_app(dsn, results)
    async with app.open_async():
        print("READY", flush=True)
        await app.run_worker_async(concurrency=CONCURRENCY, wait=True, install_signal_handlers=True)


async def _pgqueuer_worker(dsn: str, with_result: bool = False) -> None:
    from pgqueuer import Queries
    from pgqueuer.db import AsyncpgDriver
    from pgqueuer.models import Job
    from pgqueuer.qm import QueueManager

    results = _ResultWriter(dsn) if with_result else None
    if results is not None:
        await results.open()
    conn = await asyncpg.connect(dsn)
    qm = QueueManager(Queries(AsyncpgDriver(conn)))

    @qm.entrypoint("noop")
    async def noop(job: Job) -> None:
        if results is not None:
            await results.write(str(job.id))

    print("READY", flush=True)
    await qm.run(batch_size=10)


WORKERS: dict[str, Callable[[str], Coroutine[Any, Any, None]]] = {
    "imagen-queue": _imagen_queue_worker,
    "pgqueuer": _pgqueuer_worker,
    "pgqueuer+result": lambda dsn: _pgqueuer_worker(dsn, with_result=True),
    "procrastinate": _procrastinate_worker,
    "procrastinate+result": lambda dsn: _procrastinate_worker(dsn, with_result=True),
}
# The end-to-end systems: imagen-worker processes, each with these output settings.
END_TO_END: dict[str, dict[str, Any]] = {
    "imagen": {},
    "imagen-lean": {"thumbnail_size": 0, "write_metadata_json": False},
}
SYSTEMS = (
    "imagen",
    "imagen-lean",
    "imagen-queue",
    "pgqueuer",
    "pgqueuer+result",
    "procrastinate",
    "procrastinate+result",
)


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
                raise RuntimeError(f"worker {proc.args!r} did not become ready (exit {proc.returncode})")
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
    base = system.removesuffix("+result")
    async with scratch_database(
        f"bench_tp_{base.replace('-', '_')}", migrated=system.startswith("imagen")
    ) as dsn:
        conn = await asyncpg.connect(dsn)
        procs: list[subprocess.Popen[bytes]] = []
        log = workdir / f"{system}-{processes}.log"
        try:
            if system.endswith("+result"):
                await conn.execute(RESULTS_TABLE)
            if base == "pgqueuer":
                from pgqueuer import Queries
                from pgqueuer.db import AsyncpgDriver

                await Queries(AsyncpgDriver(conn)).install()
            elif base == "procrastinate":
                app = _procrastinate_app(dsn)
                async with app.open_async():
                    await app.schema_manager.apply_schema_async()

            if system in END_TO_END:
                config = write_worker_config(
                    workdir / f"{system}-{processes}",
                    backends={"mock": {"type": "mock", "latency_ms": 0, "capacity": CONCURRENCY}},
                    worker={"concurrency": CONCURRENCY, "poll_interval": 5.0},
                    output=END_TO_END[system],
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
                    return not await conn.fetchval(IMAGEN_LIVE)
            elif base == "pgqueuer":
                from pgqueuer import Queries
                from pgqueuer.db import AsyncpgDriver

                await Queries(AsyncpgDriver(conn)).enqueue(["noop"] * jobs, [None] * jobs, [0] * jobs)

                async def finished() -> bool:
                    return not await conn.fetchval(PGQUEUER_LIVE)
            else:
                app = _procrastinate_app(dsn)
                async with app.open_async():
                    await app.tasks["noop"].batch_defer_async(*({} for _ in range(jobs)))

                async def finished() -> bool:
                    return not await conn.fetchval(PROCRASTINATE_LIVE)

            enqueued = time.monotonic() - t0
            elapsed = await _poll(finished, timeout=max(120.0, jobs / 20))
            if system.startswith("imagen"):
                bad = await conn.fetchval("SELECT count(*) FROM imagen.jobs WHERE status <> 'done'")
                images = await conn.fetchval("SELECT count(*) FROM imagen.images")
                assert bad == 0 and images == jobs, (bad, images)
            if base == "procrastinate":
                succeeded = await conn.fetchval(
                    "SELECT count(*) FROM procrastinate_jobs WHERE status = 'succeeded'"
                )
                assert succeeded == jobs, (succeeded, jobs)
            if system.endswith("+result"):
                written = await conn.fetchval("SELECT count(*) FROM bench_results")
                assert written == jobs, (written, jobs)
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


async def run(
    jobs: int = 4000,
    imagen_jobs: int | None = None,
    *,
    systems: tuple[str, ...] = SYSTEMS,
    process_counts: tuple[int, ...] = (1, 4),
    repeat: int = 1,
) -> dict[str, Any]:
    """Every system at every process count; with ``repeat`` > 1 the rounds interleave the
    systems, every other round in reverse order (A B C, C B A, A B C, ...), so a machine that
    drifts through the run favours no system; the table shows each system's median, and each
    goal is the median of its per-round ratios, with their range."""
    info = await machine_info()
    results: list[dict[str, Any]] = []
    with scratch_directory("imagen-bench-tp-") as tmp:
        for round_ in range(repeat):
            for processes in process_counts:
                for system in round_order(systems, round_):
                    n = imagen_jobs or jobs if system in END_TO_END else jobs
                    result = await measure(system, processes, n, tmp)
                    result["round"] = round_
                    results.append(result)
                    print(
                        f"  {system:20s} x{processes}: {result['jobs_per_second']:>9,.1f} jobs/s", flush=True
                    )
    by: dict[tuple[str, int], float] = {}
    for system in systems:
        for processes in process_counts:
            rates = [
                r["jobs_per_second"] for r in results if (r["system"], r["processes"]) == (system, processes)
            ]
            by[(system, processes)] = statistics.median(rates)
    rows = []
    for system in systems:
        for processes in process_counts:
            rate = by[(system, processes)]
            rows.append((
                system, processes, jobs, repeat, rate,
                _ratio(rate, by.get(("imagen", processes))),
                _ratio(rate, by.get(("imagen-queue", processes))),
            ))  # fmt: skip
    print_table(
        "Throughput (burn-down of a pre-enqueued batch; median jobs/s; ratios: this system / imagen)",
        ["system", "procs", "jobs", "runs", "jobs/s", "x imagen e2e", "x imagen queue"],
        rows,
    )
    goals = []
    for processes in process_counts:
        for name, ours, theirs, goal in GOALS:
            ratios = round_ratios(results, processes, ours, theirs)
            if ratios:
                spread = f"{min(ratios):.2f}-{max(ratios):.2f}"
                goals.append((f"{name}, {processes} proc", goal, round(statistics.median(ratios), 2), spread))
    print_table(
        "Goals (per round: this system / the other, run next to it; the median and the range over rounds)",
        ["ratio", "goal", "measured", "rounds"],
        goals,
    )
    result = {
        "machine": info,
        "parameters": {"jobs": jobs, "concurrency_per_process": CONCURRENCY, "repeat": repeat},
        "versions": _versions(),
        "runs": results,
        "median_jobs_per_second": {f"{s} x{p}": v for (s, p), v in by.items()},
        "goals": [dict(zip(("ratio", "goal", "median", "range"), goal, strict=True)) for goal in goals],
        "recorded": datetime.now(UTC).isoformat(),
    }
    write_result(NAME, result)
    return result


def _ratio(a: float | None, b: float | None) -> float | str:
    return round(a / b, 2) if a and b else "-"


def round_order(systems: tuple[str, ...], round_: int) -> tuple[str, ...]:
    """A B C, then C B A: a drift through the run (the disk, the page cache) cancels out."""
    return systems if round_ % 2 == 0 else systems[::-1]


GOALS = (
    ("queue only / pgqueuer", "imagen-queue", "pgqueuer", ">= 1.0"),
    ("end to end / procrastinate no-op", "imagen", "procrastinate", ">= 2.0"),
)


def round_ratios(results: list[dict[str, Any]], processes: int, ours: str, theirs: str) -> list[float]:
    """``ours`` / ``theirs`` in each round both ran in."""
    rate = {(r["round"], r["system"]): r["jobs_per_second"] for r in results if r["processes"] == processes}
    rounds = sorted({r for r, _ in rate})
    return [rate[(r, ours)] / rate[(r, theirs)] for r in rounds if (r, ours) in rate and (r, theirs) in rate]


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
    parser.add_argument("--systems", nargs="+", choices=SYSTEMS, default=list(SYSTEMS))
    parser.add_argument("--processes", nargs="+", type=int, default=[1, 4])
    parser.add_argument("--repeat", type=int, default=1, help="interleaved rounds; the table shows medians")
    parser.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    parser.add_argument("--dsn", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(WORKERS[args.worker](args.dsn))
        return
    asyncio.run(
        run(args.jobs, systems=tuple(args.systems), process_counts=tuple(args.processes), repeat=args.repeat)
    )


if __name__ == "__main__":
    main()
