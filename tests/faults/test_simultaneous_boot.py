"""Two workers booting at the same moment over a table full of expired leases.

A crashed fleet leaves ``running`` rows whose leases ran out. When two workers start together,
both recover expired leases and both claim at once; each job must still run exactly once, with
one more attempt than the crashed worker spent.
"""

from __future__ import annotations

import uuid
from pathlib import Path

import asyncpg
import pytest

from tests.faults.harness import Fleet, insert_jobs, settled
from tests.faults.ledger import assert_each_done_exactly_once

pytestmark = pytest.mark.slow


async def test_two_workers_booting_together_recover_each_expired_job_once(
    db: asyncpg.Pool, database_url: str, tmp_path: Path
) -> None:
    jobs = await insert_jobs(db, 24, backend="gpu")
    crashed = uuid.uuid4()  # a worker that crashed: no registry row, no live process
    await db.execute(
        "UPDATE imagen.jobs SET status = 'running', attempts = 1, "
        "started_at = now() - interval '2 minutes', lease_expires_at = now() - interval '1 minute' "
        "WHERE id = ANY($1::uuid[])",
        jobs,
    )
    await db.execute(
        "INSERT INTO imagen.job_runs (job_id, worker_id, attempt) SELECT unnest($1::uuid[]), $2, 1 "
        "ON CONFLICT (job_id) DO UPDATE SET worker_id = EXCLUDED.worker_id, attempt = 1",
        jobs,
        crashed,
    )
    async with Fleet(database_url, tmp_path) as fleet:
        backends = {"gpu": fleet.backend(latency_ms=800, capacity=4)}
        settings = {"poll_interval": 0.5, "concurrency": 4}
        first = fleet.add("first", backends=backends, worker=settings)
        second = fleet.add("second", backends=backends, worker=settings)
        await fleet.start(first, second)
        await settled(db, jobs, within=30)

    runs = await assert_each_done_exactly_once(db, fleet.ledger, jobs, attempts=2)
    assert {run.pid for run in runs} == {first.pid, second.pid}, "both workers recovered some of the jobs"
