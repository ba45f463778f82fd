"""A fleet of real ``imagen-worker run`` processes, each reaching PostgreSQL through its own
fault proxy, sharing one recording ledger.

Each worker has its own config directory (its served backends may differ) and its own proxy,
so a fault can hit one worker's database path while the others carry on. A stopped worker can
be started again with the same config and proxy, as a deploy would.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Self

import asyncpg

from tests.faults.proxy import FaultProxy
from tests.faults.recording import subprocess_env
from tests.workers import WorkerProcess, eventually, write_config

OWNER = uuid.UUID("00000000-0000-4000-8000-0000000000fa")


class FaultWorker:
    def __init__(self, fleet: Fleet, name: str, config_path: Path) -> None:
        self.fleet = fleet
        self.name = name
        self.config_path = config_path
        self.proxy = FaultProxy.for_dsn(fleet.database_url)
        self.proxy.start()
        self.process: WorkerProcess | None = None
        self.pids: list[int] = []

    @property
    def pid(self) -> int:
        assert self.process is not None, f"worker {self.name} is not running"
        return self.process.pid

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.proc.poll() is None

    def spawn(self) -> None:
        assert not self.alive, f"worker {self.name} is already running"
        log = self.fleet.directory / f"{self.name}.log"
        self.process = WorkerProcess(
            self.proxy.dsn(self.fleet.database_url), self.config_path, log, env=self.fleet.env
        )
        self.pids.append(self.process.pid)

    async def start(self) -> None:
        self.spawn()
        await self.fleet.wait_registered(self)

    async def stop(self, timeout: float = 30) -> int:
        """SIGTERM, as a deploy does; returns the exit code."""
        assert self.process is not None
        return await self.process.terminate(timeout)

    def close(self) -> None:
        if self.process is not None:
            self.process.stop()
        self.proxy.close()


class Fleet:
    def __init__(self, database_url: str, directory: Path) -> None:
        self.database_url = database_url
        self.directory = directory
        self.ledger = directory / "ledger.jsonl"
        self.env = subprocess_env(directory / "entry-points")
        self.workers: list[FaultWorker] = []

    def backend(self, latency_ms: float, capacity: int = 4) -> dict[str, Any]:
        """A ``type: recording`` block writing to this fleet's ledger."""
        return {
            "type": "recording",
            "ledger": str(self.ledger),
            "latency_ms": latency_ms,
            "capacity": capacity,
        }

    def add(
        self,
        name: str,
        *,
        backends: Mapping[str, Mapping[str, Any]],
        worker: Mapping[str, Any] | None = None,
        **top: Any,
    ) -> FaultWorker:
        """A worker (not started yet) with its own config and proxy."""
        config_dir = self.directory / name
        config_dir.mkdir(parents=True, exist_ok=True)
        path = write_config(
            config_dir,
            backends={k: dict(v) for k, v in backends.items()},
            worker={"lease_seconds": 3, **(worker or {})},
            **top,
        )
        fault_worker = FaultWorker(self, name, path)
        self.workers.append(fault_worker)
        return fault_worker

    async def wait_registered(self, *workers: FaultWorker, within: float = 30) -> None:
        """Until each worker's current process has a live row in ``imagen.workers``."""
        conn = await asyncpg.connect(self.database_url)
        try:

            async def check() -> bool:
                for w in workers:
                    if not w.alive:
                        assert w.process is not None
                        code = w.process.proc.returncode
                        raise AssertionError(f"worker {w.name} exited early with {code}; see {w.name}.log")
                live = await conn.fetchval(
                    "SELECT count(*) FROM imagen.workers WHERE pid = ANY($1) AND expires_at > now()",
                    [w.pid for w in workers],
                )
                return bool(live == len(workers))

            await eventually(check, within=within, every=0.1)
        finally:
            await conn.close()

    async def start(self, *workers: FaultWorker) -> None:
        """Spawn several workers at the same moment and wait until all are registered."""
        for w in workers:
            w.spawn()
        await self.wait_registered(*workers)

    async def stop(self) -> None:
        """Heal every path, SIGTERM every running worker at once and wait (without blocking the
        event loop, which may run a fake the workers still talk to)."""
        for w in self.workers:
            w.proxy.restore()
        await asyncio.gather(*(w.stop() for w in self.workers if w.alive), return_exceptions=True)

    def close(self) -> None:
        for w in self.workers:
            w.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        try:
            await self.stop()
        finally:
            self.close()


async def insert_jobs(
    db: asyncpg.Pool, count: int, *, backend: str | None = None, max_attempts: int = 3, label: str = "job"
) -> list[uuid.UUID]:
    rows = await db.fetch(
        "INSERT INTO imagen.jobs (owner_user_id, prompt, backend, width, height, max_attempts) "
        "SELECT $1, $2 || ' ' || n, $3, 64, 64, $4 FROM generate_series(1, $5) AS n RETURNING id",
        OWNER,
        label,
        backend,
        max_attempts,
        count,
    )
    return [row["id"] for row in rows]


async def statuses(db: asyncpg.Pool, jobs: Iterable[uuid.UUID]) -> dict[str, int]:
    rows = await db.fetch(
        "SELECT status, count(*)::int AS n FROM imagen.jobs WHERE id = ANY($1::uuid[]) GROUP BY status",
        list(jobs),
    )
    return {row["status"]: row["n"] for row in rows}


async def settled(db: asyncpg.Pool, jobs: list[uuid.UUID], *, within: float) -> dict[str, int]:
    """Wait until no job is pending or running (or the time is up); returns the final counts."""

    async def check() -> dict[str, int] | None:
        counts = await statuses(db, jobs)
        return counts if not counts.get("pending") and not counts.get("running") else None

    try:
        result: dict[str, int] = await eventually(check, within=within, every=0.2)
    except AssertionError:
        return await statuses(db, jobs)
    return result


async def running_on(db: asyncpg.Pool, worker: FaultWorker) -> list[uuid.UUID]:
    rows = await db.fetch(
        "SELECT j.id FROM imagen.jobs j JOIN imagen.job_runs r ON r.job_id = j.id "
        "JOIN imagen.workers w ON w.id = r.worker_id "
        "WHERE j.status = 'running' AND w.pid = $1",
        worker.pid,
    )
    return [row["id"] for row in rows]
