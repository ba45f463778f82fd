"""A database path that silently drops everything for longer than the lease, then heals.

The lease is 3 s and every job renders for 6 s, so the blackhole (4.5 s) outlasts a lease while
the jobs are still rendering. One job must never render twice at the same time: a worker that
cannot renew a lease stops that job before the lease can run out (its last renewal came before
the blackhole, so by ``blackhole start + lease`` at the latest), and only then may the job be
taken again; it finishes once, with at most one more attempt.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import asyncpg
import pytest

from tests.faults.harness import FaultWorker, Fleet, insert_jobs, settled
from tests.faults.ledger import Execution, assert_each_done_exactly_once, read_ledger
from tests.workers import eventually

pytestmark = pytest.mark.slow

LEASE = 3.0
SETTINGS = {"poll_interval": 0.5, "concurrency": 2, "lease_seconds": LEASE}
BLACKHOLE = 4.5


def assert_gave_up_in_time(runs: list[Execution], pid: int, blackhole_started: float) -> None:
    """Every render of ``pid`` running when the path went dark ended before its lease could expire."""
    cut = [run for run in runs if run.pid == pid and run.start < blackhole_started]
    assert cut, "the blackhole hit jobs in flight"
    late = [run for run in cut if run.end is None or run.end > blackhole_started + LEASE]
    assert not late, (
        f"{len(late)} renders went on after their lease expired: ended "
        f"{[None if r.end is None else round(r.end - blackhole_started, 2) for r in late]} s after the "
        f"blackhole began (lease {LEASE} s)"
    )


async def test_a_blackholed_worker_never_renders_alongside_the_worker_that_takes_over(
    db: asyncpg.Pool, database_url: str, tmp_path: Path
) -> None:
    async with Fleet(database_url, tmp_path) as fleet:
        backends = {"gpu": fleet.backend(latency_ms=6000, capacity=2)}
        cut_off = fleet.add("cut-off", backends=backends, worker=SETTINGS)
        rescuer = fleet.add("rescuer", backends=backends, worker=SETTINGS)
        await cut_off.start()
        stranded = await insert_jobs(db, 2, backend="gpu", label="stranded")
        await eventually(lambda: _rendering(fleet, cut_off, 2), within=15)
        await rescuer.start()

        cut_off.proxy.blackhole()
        went_dark = time.time()
        await asyncio.sleep(BLACKHOLE)
        cut_off.proxy.restore()
        later = await insert_jobs(db, 4, backend="gpu", label="after recovery")
        await settled(db, stranded + later, within=40)

    runs = await assert_each_done_exactly_once(
        db, fleet.ledger, stranded + later, attempts=lambda job: (1, 2) if job in stranded else 1
    )
    assert_gave_up_in_time(runs, cut_off.pids[0], went_dark)


async def test_a_worker_whose_own_path_was_blackholed_does_not_run_its_job_twice(
    db: asyncpg.Pool, database_url: str, tmp_path: Path
) -> None:
    async with Fleet(database_url, tmp_path) as fleet:
        alone = fleet.add(
            "alone", backends={"gpu": fleet.backend(latency_ms=6000, capacity=2)}, worker=SETTINGS
        )
        await alone.start()
        jobs = await insert_jobs(db, 2, backend="gpu")
        await eventually(lambda: _rendering(fleet, alone, 2), within=15)

        alone.proxy.blackhole()
        went_dark = time.time()
        await asyncio.sleep(BLACKHOLE)
        alone.proxy.restore()
        await settled(db, jobs, within=40)

    runs = await assert_each_done_exactly_once(db, fleet.ledger, jobs, attempts=(1, 2))
    assert_gave_up_in_time(runs, alone.pid, went_dark)


async def _rendering(fleet: Fleet, worker: FaultWorker, count: int) -> bool:
    """The worker's backend is rendering ``count`` jobs (not only claimed: started)."""
    runs = read_ledger(fleet.ledger)
    return sum(1 for run in runs if run.pid == worker.pid and run.end is None) == count
