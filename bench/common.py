"""Shared helpers: scratch databases, worker subprocesses, percentiles, tables and JSON results."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import yaml

from imagen_worker.db.connect import connect, embedded_dsn
from imagen_worker.db.migrate import migrate

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results"
DEFAULT_DSN = "postgresql://postgres@127.0.0.1:5432/postgres"


_resolved_dsn: str | None = None


def server_dsn(fallback: Callable[[], str] = embedded_dsn) -> str:
    """The maintenance database to create scratch databases from.

    ``IMAGEN_BENCH_DATABASE_URL``, else ``IMAGEN_TEST_DATABASE_URL``, else a server answering
    at 127.0.0.1:5432, else the embedded server ``make demo`` uses: a fresh clone benchmarks
    without a PostgreSQL of its own, as it tests without one. Decided once per process.
    """
    global _resolved_dsn
    for var in ("IMAGEN_BENCH_DATABASE_URL", "IMAGEN_TEST_DATABASE_URL"):
        if value := os.environ.get(var):
            return value
    if _resolved_dsn is None:
        if _answers(DEFAULT_DSN):
            _resolved_dsn = DEFAULT_DSN
        else:
            _resolved_dsn = fallback()
            where = urlsplit(DEFAULT_DSN)
            print(f"  no PostgreSQL at {where.hostname}:{where.port}: using the embedded server", flush=True)
    return _resolved_dsn


def _answers(dsn: str) -> bool:
    parts = urlsplit(dsn)
    try:
        socket.create_connection((parts.hostname or "127.0.0.1", parts.port or 5432), timeout=2).close()
    except OSError:
        return False
    return True


def with_database(dsn: str, name: str) -> str:
    return urlunsplit(urlsplit(dsn)._replace(path=f"/{name}"))


@contextlib.asynccontextmanager
async def scratch_database(
    prefix: str, *, migrated: bool = True, dsn: str | None = None
) -> AsyncIterator[str]:
    """A new database (migrated unless told otherwise), dropped with FORCE afterwards."""
    admin_dsn = dsn or server_dsn()
    name = f"imagen_{prefix}_{uuid.uuid4().hex[:10]}"
    admin = await asyncpg.connect(admin_dsn)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    url = with_database(admin_dsn, name)
    try:
        if migrated:
            conn = await connect(url)
            try:
                await migrate(conn)
            finally:
                await conn.close()
        yield url
    finally:
        admin = await asyncpg.connect(admin_dsn)
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await admin.close()


# Set while ``python -m bench`` runs: scratch directories are removed once every benchmark is over.
_deferred: list[Path] | None = None


@contextlib.contextmanager
def scratch_directory(prefix: str) -> Iterator[Path]:
    """A new directory for one benchmark's files (the workers' images among them).

    Under ``python -m bench`` it is removed only after the last benchmark: on a filesystem
    without a journal, ext4 makes every new file skip the inodes freed in the last minutes, so
    one benchmark's removal of thousands of files slowed the next one's file writes
    (docs/performance.md, Findings, item 35).
    """
    path = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        yield path
    finally:
        if _deferred is not None:
            _deferred.append(path)
        else:
            shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def removals_deferred() -> Iterator[None]:
    """Keep every ``scratch_directory`` until this block ends, then remove them all."""
    global _deferred
    _deferred = []
    try:
        yield
    finally:
        kept, _deferred = _deferred, None
        for path in kept:
            shutil.rmtree(path, ignore_errors=True)


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of a non-empty sequence."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    rank = max(1, min(len(ordered), round(q / 100 * len(ordered) + 0.5)))
    return ordered[rank - 1]


def summary_ms(seconds: Sequence[float]) -> dict[str, float]:
    """p50/p95/p99/mean/min/max of durations given in seconds, reported in milliseconds."""
    ms = [s * 1000 for s in seconds]
    return {
        "n": len(ms),
        "p50_ms": round(percentile(ms, 50), 3),
        "p95_ms": round(percentile(ms, 95), 3),
        "p99_ms": round(percentile(ms, 99), 3),
        "mean_ms": round(statistics.fmean(ms), 3),
        "min_ms": round(min(ms), 3),
        "max_ms": round(max(ms), 3),
    }


def print_table(title: str, headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
    body = [[_cell(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in body)) if body else len(h) for i, h in enumerate(headers)]
    print(f"\n{title}")
    print("  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)))
    print("  ".join("-" * w for w in widths))
    for row in body:
        print(
            "  ".join(
                c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True))
            )
        )
    sys.stdout.flush()


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:,.3f}" if abs(value) < 100 else f"{value:,.1f}"
    return str(value)


async def machine_info(dsn: str | None = None) -> dict[str, Any]:
    import psutil

    conn = await asyncpg.connect(dsn or server_dsn())
    try:
        pg_version = await conn.fetchval("SHOW server_version")
        settings = {
            name: await conn.fetchval(f"SHOW {name}")
            for name in ("shared_buffers", "synchronous_commit", "fsync", "max_connections")
        }
    finally:
        await conn.close()
    return {
        "nproc": os.cpu_count(),
        "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "cpu": platform.processor() or platform.machine(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "postgresql": pg_version,
        "postgresql_settings": settings,
        "connection": "asyncpg over TCP 127.0.0.1",
    }


def write_result(name: str, data: Mapping[str, Any]) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    payload = {"benchmark": name, "recorded_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **data}
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=str) + "\n", encoding="utf-8")
    tmp.replace(path)
    print(f"  -> {path.relative_to(ROOT)}")
    return path


# --- worker subprocesses ---------------------------------------------------------------


def write_worker_config(
    directory: Path,
    *,
    backends: Mapping[str, Mapping[str, Any]],
    storage: Mapping[str, Any] | None = None,
    worker: Mapping[str, Any] | None = None,
    output: Mapping[str, Any] | None = None,
) -> Path:
    """An imagen.yaml for a benchmark worker; output goes to ``directory/images``."""
    directory.mkdir(parents=True, exist_ok=True)
    data: dict[str, Any] = {
        "backends": {name: dict(block) for name, block in backends.items()},
        "output": {"directory": str(directory / "images"), "cloud_sync": "off", **(output or {})},
        "storage": dict(storage or {"type": "local"}),
        "worker": dict(worker or {}),
        "metrics": {"enabled": False},
    }
    path = directory / "imagen.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


def worker_env(dsn: str, config_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("IMAGEN_", "SUPABASE_"))}
    env.update(
        {
            "IMAGEN_DATABASE_URL": dsn,
            "IMAGEN_CONFIG": str(config_path),
            "IMAGEN_CLOUD_SYNC": "off",
            "PYTHONUNBUFFERED": "1",
            **extra,
        }
    )
    return env


def worker_command() -> list[str]:
    """``imagen-worker run`` from this environment (the console script when installed)."""
    script = Path(sys.executable).with_name("imagen-worker")
    base = [str(script)] if script.exists() else [
        sys.executable, "-c", "import sys; from imagen_worker.cli.worker import main; "
        "sys.argv[0] = 'imagen-worker'; main()"
    ]  # fmt: skip
    return [*base, "run", "--no-migrate", "--no-metrics", "--log-format", "json", "--log-level", "warning"]


def spawn_worker(env: Mapping[str, str], log_path: Path) -> subprocess.Popen[bytes]:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        return subprocess.Popen(
            worker_command(), env=dict(env), stdout=log, stderr=subprocess.STDOUT, cwd=str(ROOT),
            start_new_session=True,
        )  # fmt: skip


def stop_worker(proc: subprocess.Popen[bytes], *, timeout: float = 15.0) -> None:
    """SIGTERM, then SIGKILL if it does not exit in time; never raises for an exited process."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        proc.wait(timeout=5)


def kill_worker(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        proc.wait(timeout=10)


async def wait_for_workers(conn: asyncpg.Connection, count: int, *, timeout: float = 30.0) -> None:
    """Until ``count`` live workers are registered in imagen.workers."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        live = await conn.fetchval("SELECT count(*) FROM imagen.workers WHERE expires_at > now()")
        if live >= count:
            return
        await asyncio.sleep(0.05)
    raise TimeoutError(f"only {live} of {count} workers registered within {timeout}s")


async def wait_until_terminal(conn: asyncpg.Connection, total: int, *, timeout: float) -> float:
    """Poll until ``total`` jobs are done/failed/cancelled; returns the wall time waited."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        finished = await conn.fetchval(
            "SELECT count(*) FROM imagen.jobs WHERE status IN ('done', 'failed', 'cancelled')"
        )
        if finished >= total:
            return time.monotonic() - started
        await asyncio.sleep(0.02)
    raise TimeoutError(f"{finished} of {total} jobs finished within {timeout}s")


INSERT_JOBS = """
INSERT INTO imagen.jobs (owner_user_id, prompt, backend, width, height, params, max_attempts, run_at)
SELECT $1, 'bench job ' || g, $3, 64, 64, '{}'::jsonb, $4, now() + make_interval(secs => $5)
FROM generate_series(1, $2) AS g
"""


async def insert_jobs(
    conn: asyncpg.Connection,
    count: int,
    *,
    backend: str | None = None,
    max_attempts: int = 3,
    delay_seconds: float = 0.0,
    owner: uuid.UUID | None = None,
) -> None:
    """Bulk-insert ``count`` small (64x64) jobs in one statement."""
    await conn.execute(INSERT_JOBS, owner or uuid.uuid4(), count, backend, max_attempts, float(delay_seconds))
