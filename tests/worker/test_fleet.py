"""Fleet operations with real ``imagen-worker run`` processes: a routine restart loses nothing."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import uuid
from pathlib import Path

import asyncpg

from tests.workers import BIN, WorkerProcess, eventually, wait_registered, worker_env, write_config

OWNER = uuid.UUID("00000000-0000-4000-8000-000000000010")


async def counts(db: asyncpg.Pool) -> dict[str, int]:
    rows = await db.fetch("SELECT status, count(*)::int AS n FROM imagen.jobs GROUP BY status")
    return {row["status"]: row["n"] for row in rows}


async def test_a_rolling_restart_of_the_only_worker_for_a_backend_fails_no_queued_job(
    db: asyncpg.Pool, database_url: str, tmp_path: Path
) -> None:
    """The issue's scenario: B serves ``mock`` (the default), A serves ``slow``; 30 jobs for
    ``slow`` are queued; A gets SIGTERM, stays down 10 s (a deploy) and comes back."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    worker = {"poll_interval": 0.2, "lease_seconds": 3, "concurrency": 2}
    slow = write_config(tmp_path / "a", backends={"slow": {"type": "mock", "latency_ms": 300}},
                        default_backend="slow", worker=worker)  # fmt: skip
    default = write_config(
        tmp_path / "b", backends={"mock": {"type": "mock"}}, default_backend="mock", worker=worker
    )
    b = WorkerProcess(database_url, default, tmp_path / "b.log")
    a = WorkerProcess(database_url, slow, tmp_path / "a.log")
    try:
        await wait_registered(db, a, b)
        await db.execute(
            "INSERT INTO imagen.jobs (owner_user_id, prompt, backend, steps) "
            "SELECT $1, 'slow job ' || n, 'slow', 3 FROM generate_series(1, 30) AS n",
            OWNER,
        )
        await eventually(lambda: _done_at_least(db, 4), within=20, every=0.1)
        a.signal(signal.SIGTERM)
        assert await asyncio.to_thread(a.wait, 30) == 0
        a.stop()

        await asyncio.sleep(10)  # the deploy: nobody serves 'slow', B keeps running
        during = await counts(db)
        waiting = await db.fetchval(
            "SELECT progress->>'message' FROM imagen.jobs WHERE status = 'pending' LIMIT 1"
        )
        a = WorkerProcess(database_url, slow, tmp_path / "a-again.log")
        await eventually(lambda: _done_at_least(db, 30), within=60, every=0.2)
    finally:
        a.stop()
        b.stop()

    assert "failed" not in during and during.get("pending", 0) > 0, during
    assert waiting == "no worker serves backend 'slow' yet"
    assert await counts(db) == {"done": 30}
    assert await db.fetchval("SELECT count(*) FROM imagen.images") == 30
    assert await db.fetchval("SELECT max(attempts) FROM imagen.jobs") == 1
    assert await db.fetchval("SELECT count(*) FROM imagen.jobs WHERE progress->>'state' = 'waiting'") == 0


async def _done_at_least(db: asyncpg.Pool, n: int) -> bool:
    return (await counts(db)).get("done", 0) >= n


async def test_the_refusal_to_start_without_serving_the_default_backend_is_one_line(
    db: asyncpg.Pool, database_url: str, tmp_path: Path
) -> None:
    config = write_config(
        tmp_path,
        backends={"mock": {"type": "mock"}, "slow": {"type": "mock"}},
        worker={"backends": ["slow"]},
    )
    result = await asyncio.to_thread(
        subprocess.run,
        [str(BIN / "imagen-worker"), "run", "--no-migrate", "--no-metrics"],
        env={**worker_env(database_url, config), "PATH": os.environ.get("PATH", "")},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        "imagen-worker: default_backend: 'mock' (the first configured backend) is not served by this "
        "worker (it serves slow); set default_backend to one of them"
    ]
    assert await db.fetchval("SELECT count(*) FROM imagen.workers") == 0
