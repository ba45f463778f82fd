"""A deploy: every worker restarted one by one under a backlog, none failed, none run twice.

Three workers over two backends: ``alpha`` is served by worker 0 alone, ``beta`` by workers 1
and 2, so while worker 0 is down nobody serves ``alpha`` at all, as during the deploy of a
single-GPU host. Each worker is stopped with SIGTERM (its renders in flight finish within the
shutdown grace, as in a deploy), stays down longer than a poll interval, and comes back.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import asyncpg
import pytest

from tests.faults.harness import Fleet, insert_jobs, settled
from tests.faults.ledger import assert_each_done_exactly_once

pytestmark = pytest.mark.slow

POLL = 0.5
DOWN = 1.5  # longer than a poll interval, and than a registry row's first refresh


async def test_a_rolling_restart_under_a_backlog_finishes_every_job_exactly_once(
    db: asyncpg.Pool, database_url: str, tmp_path: Path
) -> None:
    async with Fleet(database_url, tmp_path) as fleet:
        backends = {"alpha": fleet.backend(latency_ms=250, capacity=2), "beta": fleet.backend(400, 2)}
        settings = {"poll_interval": POLL, "concurrency": 2, "shutdown_grace": 5}
        workers = [
            fleet.add(
                "w0", backends=backends, worker={**settings, "backends": ["alpha"]}, default_backend="alpha"
            ),
            fleet.add(
                "w1", backends=backends, worker={**settings, "backends": ["beta"]}, default_backend="beta"
            ),
            fleet.add(
                "w2", backends=backends, worker={**settings, "backends": ["beta"]}, default_backend="beta"
            ),
        ]
        await fleet.start(*workers)
        jobs = await insert_jobs(db, 100, backend="alpha") + await insert_jobs(db, 100, backend="beta")

        backlog_at_restart = []
        for worker in workers:
            served = "alpha" if worker.name == "w0" else "beta"
            backlog_at_restart.append(
                await db.fetchval(
                    "SELECT count(*) FROM imagen.jobs WHERE backend = $1 AND status = 'pending'", served
                )
            )
            assert await worker.stop() == 0
            await asyncio.sleep(DOWN)
            await worker.start()
        await settled(db, jobs, within=60)

    runs = await assert_each_done_exactly_once(db, fleet.ledger, jobs, attempts=1)
    assert all(backlog > 0 for backlog in backlog_at_restart), (
        f"a backlog at each restart: {backlog_at_restart}"
    )
    assert len({run.pid for run in runs}) >= 4, "restarted processes took part in the work"
