"""Progress writes from a running job: throttled, and none at all for a job that ends at once."""

from __future__ import annotations

import asyncio
import uuid

import asyncpg

from imagen_worker.queue.jobs import Job, Queue
from imagen_worker.worker.context import WorkerJobContext
from tests.workers import insert_job, job_row


async def claimed(db: asyncpg.Pool, backend: str) -> tuple[Queue, Job]:
    queue = Queue(db, uuid.uuid4())
    job_id = await insert_job(db, "progress", backend=backend)
    jobs = await queue.claim(backend, is_default=False, limit=1, lease_seconds=30)
    assert [job.id for job in jobs] == [job_id]
    return queue, jobs[0]


async def test_a_job_that_ends_before_the_first_write_is_due_writes_no_progress(db: asyncpg.Pool) -> None:
    queue, job = await claimed(db, f"quick-{uuid.uuid4().hex[:8]}")
    ctx = WorkerJobContext(queue, job, first_after=0.25)

    ctx.report_progress(1, 4)
    ctx.report_progress(4, 4)
    await ctx.close()

    assert (await job_row(db, job.id))["progress"] is None


async def test_a_longer_job_writes_progress_once_due_then_its_last_value_at_close(db: asyncpg.Pool) -> None:
    queue, job = await claimed(db, f"slow-{uuid.uuid4().hex[:8]}")
    ctx = WorkerJobContext(queue, job, first_after=0.1, min_interval=60)

    ctx.report_progress(1, 4)
    await asyncio.sleep(0.3)
    first = (await job_row(db, job.id))["progress"]
    ctx.report_progress(3, 4)
    await asyncio.sleep(0.1)
    throttled = (await job_row(db, job.id))["progress"]
    await ctx.close()
    last = (await job_row(db, job.id))["progress"]

    assert first["value"] == 1 and first["percent"] == 25.0
    assert throttled["value"] == 1, "the next write waits for min_interval"
    assert last["value"] == 3, "close writes the latest value once progress was shown"
