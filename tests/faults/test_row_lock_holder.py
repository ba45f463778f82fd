"""A client holding ``SELECT ... FOR UPDATE`` on one running job's row for longer than the lease.

An operator's psql session, a migration or a slow report can lock one row for a long time. It
may delay that one job, never the others: while the lock is held the other jobs' leases keep
being renewed (never expire, never change hands) and the worker keeps its registry row fresh;
the locked job finishes after the lock is released, once, with at most one more attempt.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any
from uuid import UUID

import asyncpg
import pytest

from tests.faults.harness import Fleet, insert_jobs, running_on, settled
from tests.faults.ledger import assert_each_done_exactly_once
from tests.workers import eventually

pytestmark = pytest.mark.slow

LEASE = 3.0
HOLD = 7.0  # more than two leases


async def test_a_row_lock_held_past_the_lease_delays_only_that_job(
    db: asyncpg.Pool, database_url: str, tmp_path: Path
) -> None:
    async with Fleet(database_url, tmp_path) as fleet:
        worker = fleet.add(
            "worker",
            backends={"gpu": fleet.backend(latency_ms=8000, capacity=3)},
            worker={"poll_interval": 0.5, "concurrency": 3, "lease_seconds": LEASE},
        )
        await worker.start()
        jobs = await insert_jobs(db, 3, backend="gpu")
        await eventually(lambda: _count_running(db, worker, 3), within=15)
        locked, *others = jobs

        holder = await asyncpg.connect(database_url)
        try:
            samples = await _hold_lock_and_watch(holder, db, locked, others, worker.pid)
        finally:
            await holder.close()
        released = time.time()
        await settled(db, jobs, within=30)

    expired = [s for s in samples if s["expired_others"]]
    assert not expired, f"other jobs' leases ran out while one row was locked: {expired[:3]}"
    beats = sorted({s["heartbeat_at"] for s in samples})
    assert len(beats) >= HOLD / LEASE, f"the worker's registry row was refreshed during the hold: {beats}"
    runs = await assert_each_done_exactly_once(
        db, fleet.ledger, jobs, attempts=lambda job: (1, 2) if job == locked else 1
    )
    finished = [run.end for run in runs if run.job == str(locked) and run.outcome == "ok"]
    assert finished[0] is not None and finished[0] > released, "the locked job finished after the release"
    finished_at = await db.fetchval("SELECT finished_at FROM imagen.jobs WHERE id = $1", locked)
    assert finished_at.timestamp() > released


async def _hold_lock_and_watch(
    holder: asyncpg.Connection, db: asyncpg.Pool, locked: UUID, others: Sequence[UUID], pid: int
) -> list[dict[str, Any]]:
    """Lock ``locked`` for HOLD seconds; meanwhile sample the other leases and the registry."""
    samples: list[dict[str, Any]] = []
    async with holder.transaction():
        await holder.execute("SELECT * FROM imagen.jobs WHERE id = $1 FOR UPDATE", locked)
        deadline = time.monotonic() + HOLD
        while time.monotonic() < deadline:
            rows = await db.fetch(
                "SELECT id, attempts, lease_expires_at < now() AS expired FROM imagen.jobs "
                "WHERE id = ANY($1::uuid[])",
                others,
            )
            heartbeat: datetime | None = await db.fetchval(
                "SELECT heartbeat_at FROM imagen.workers WHERE pid = $1", pid
            )
            samples.append(
                {
                    "expired_others": [str(r["id"]) for r in rows if r["expired"] or r["attempts"] != 1],
                    "heartbeat_at": heartbeat,
                }
            )
            await asyncio.sleep(0.25)
    return samples


async def _count_running(db: asyncpg.Pool, worker: Any, count: int) -> bool:
    return len(await running_on(db, worker)) == count
