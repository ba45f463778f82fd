"""Test helpers: configs, in-process workers and real ``imagen-worker run`` processes."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import asyncpg
import yaml

from imagen_worker.config import Config, load_config
from imagen_worker.worker.daemon import Worker

BIN = Path(sys.executable).parent


def write_config(
    directory: Path,
    *,
    backends: dict[str, dict[str, Any]] | None = None,
    worker: dict[str, Any] | None = None,
    storage: dict[str, Any] | None = None,
    output: dict[str, Any] | None = None,
    **top: Any,
) -> Path:
    """An ``imagen.yaml`` for a test: local output under ``directory``, no cloud sync, and no
    free-space floor (a spec's few small files must not depend on how full this machine's disk
    is; the floor has specs of its own); ``output`` keys are laid over those."""
    defaults = {"directory": str(directory / "images"), "cloud_sync": "off", "min_free_mb": 0}
    body: dict[str, Any] = {
        "output": {**defaults, **(output or {})},
        "backends": backends or {"mock": {"type": "mock"}},
        "worker": {"poll_interval": 0.5, "lease_seconds": 5, "retry_base_seconds": 0.05, **(worker or {})},
        "metrics": {"enabled": False},
        **top,
    }
    if storage is not None:
        body["storage"] = storage
        body["output"]["cloud_sync"] = "on"
    path = directory / "imagen.yaml"
    path.write_text(yaml.safe_dump(body), encoding="utf-8")
    return path


def make_config(directory: Path, **kwargs: Any) -> Config:
    return load_config(write_config(directory, **kwargs))


@asynccontextmanager
async def running_worker(config: Config, dsn: str) -> AsyncIterator[Worker]:
    """A worker running in this event loop; stopped (drained) on exit."""
    worker = Worker(config, dsn, run_migrations=False)
    task = asyncio.create_task(worker.run())
    ready = asyncio.create_task(worker.ready.wait())
    done, _ = await asyncio.wait({task, ready}, timeout=20, return_when=asyncio.FIRST_COMPLETED)
    if task in done:
        task.result()  # raises the start-up error
    assert worker.ready.is_set(), "worker did not start"
    try:
        yield worker
    finally:
        worker.request_stop()
        await asyncio.wait_for(task, timeout=30)


async def eventually(
    check: Callable[[], Awaitable[Any]], *, within: float = 10.0, every: float = 0.02
) -> Any:
    """Poll ``check`` until it returns something truthy; fail with its last value."""
    deadline = time.monotonic() + within
    value = None
    while time.monotonic() < deadline:
        value = await check()
        if value:
            return value
        await asyncio.sleep(every)
    raise AssertionError(f"condition not met within {within}s (last value: {value!r})")


TEST_OWNER = uuid.UUID("00000000-0000-4000-8000-00000000000a")


async def insert_job(db: asyncpg.Pool, prompt: str = "a red fox", **columns: Any) -> uuid.UUID:
    """INSERT a job the way the web UI does: only the columns given, defaults for the rest."""
    columns.setdefault("owner_user_id", TEST_OWNER)
    names = ["prompt", *columns]
    values = [prompt, *columns.values()]
    placeholders = ", ".join(f"${i}" for i in range(1, len(values) + 1))
    statement = f"INSERT INTO imagen.jobs ({', '.join(names)}) VALUES ({placeholders}) RETURNING id"
    job_id: uuid.UUID = await db.fetchval(statement, *values)
    return job_id


async def job_row(db: asyncpg.Pool, job_id: Any) -> asyncpg.Record:
    """The operator's view of a job: its row and its worker-only run record."""
    row = await db.fetchrow(
        "SELECT j.*, w.worker_id, w.backend_ref, w.error_detail, w.result"
        " FROM imagen.jobs j LEFT JOIN imagen.job_runs w ON w.job_id = j.id WHERE j.id = $1",
        job_id,
    )
    assert row is not None
    return row


async def waiting_for_storage(db: asyncpg.Pool, job_id: Any) -> asyncpg.Record | None:
    """The job's row while its progress says it waits for Storage to answer; None otherwise."""
    row = await job_row(db, job_id)
    progress = row["progress"] or {}
    return row if progress.get("stage") == "waiting_for_storage" else None


async def terminal(db: asyncpg.Pool, job_id: Any, *, within: float = 10.0) -> asyncpg.Record:
    async def check() -> asyncpg.Record | None:
        row = await job_row(db, job_id)
        return row if row["status"] in ("done", "failed", "cancelled") else None

    result: asyncpg.Record = await eventually(check, within=within)
    return result


async def image_row(db: asyncpg.Pool, image_id: Any) -> asyncpg.Record:
    """The operator's view of an image: its row and its host-side internals."""
    row = await db.fetchrow(
        "SELECT i.*, n.local_path, n.backend_metadata FROM imagen.images i"
        " LEFT JOIN imagen.image_internals n ON n.image_id = i.id WHERE i.id = $1",
        image_id,
    )
    assert row is not None
    return row


def on_a_full_disk(mount: Path, size: str) -> list[str]:
    """A command prefix: in a mount namespace of its own (``unshare -rm``: user namespaces are
    enough), a tmpfs of ``size`` on ``mount`` filled to the brim, then the command itself, whose
    writes there meet ENOSPC from the kernel."""
    script = (
        f'mount -t tmpfs -o size={size} tmpfs "$0" '
        '&& (dd if=/dev/zero of="$0/filler" bs=64k 2>/dev/null; true) && exec "$@"'
    )
    return ["unshare", "-rm", "sh", "-c", script, str(mount)]


def worker_env(dsn: str, config_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("IMAGEN_")}
    env.update(IMAGEN_DATABASE_URL=dsn, IMAGEN_CONFIG=str(config_path))
    return env


class WorkerProcess:
    """A real ``imagen-worker run`` subprocess; ``env`` adds variables (e.g. ``PYTHONPATH``),
    ``prefix`` a command that sets the process up and then execs the worker's own command line."""

    def __init__(
        self,
        dsn: str,
        config_path: Path,
        log_path: Path,
        *,
        env: Mapping[str, str] | None = None,
        prefix: Sequence[str] = (),
    ) -> None:
        self.log = open(log_path, "ab")  # noqa: SIM115 - closed in stop()
        command = [str(BIN / "imagen-worker"), "run", "--no-migrate", "--no-metrics", "--log-format", "json"]
        self.proc = subprocess.Popen(
            [*prefix, *command],
            env={**worker_env(dsn, config_path), **(env or {})},
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(timeout=10)

    def wait(self, timeout: float) -> int:
        return self.proc.wait(timeout=timeout)

    async def terminate(self, timeout: float = 30) -> int:
        """SIGTERM and wait for the exit without blocking the event loop (fakes may live in it)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return await asyncio.to_thread(self.proc.wait, timeout)
        finally:
            self.stop()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


async def wait_registered(db: asyncpg.Pool, *procs: WorkerProcess, within: float = 30) -> None:
    pids = [p.pid for p in procs]

    async def check() -> bool:
        for p in procs:
            if p.proc.poll() is not None:
                raise AssertionError(f"worker {p.pid} exited early with {p.proc.returncode}")
        n = await db.fetchval("SELECT count(*) FROM imagen.workers WHERE pid = ANY($1)", pids)
        return bool(n == len(pids))

    await eventually(check, within=within, every=0.1)


@contextmanager
def worker_processes(dsn: str, config_path: Path, count: int, logs: Path) -> Iterator[list[WorkerProcess]]:
    procs = [WorkerProcess(dsn, config_path, logs / f"worker-{i}.log") for i in range(count)]
    try:
        yield procs
    finally:
        for proc in procs:
            proc.stop()
