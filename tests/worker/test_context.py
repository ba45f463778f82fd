"""Progress writes from a running job: throttled, and none at all for a job that ends at once."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Mapping
from typing import Any

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


class SlowQueue(Queue):
    """Progress writes that take a while, as on a busy database."""

    async def set_progress(self, job: Job, progress: Mapping[str, Any]) -> None:
        await asyncio.sleep(0.2)
        await super().set_progress(job, progress)


async def test_a_report_that_came_during_a_write_is_written_after_the_interval_without_another(
    db: asyncpg.Pool,
) -> None:
    # A long ComfyUI node sends one report as it starts and nothing until it ends: that report
    # must not wait for the next one.
    queue, job = await claimed(db, f"busy-{uuid.uuid4().hex[:8]}")
    slow = SlowQueue(db, queue.worker_id)
    ctx = WorkerJobContext(slow, job, first_after=0.05, min_interval=0.3)

    ctx.report_progress(1, 4)  # written from 0.05 s to 0.25 s
    await asyncio.sleep(0.1)
    ctx.report_progress(2, 4, message="running node 11")  # arrives during that write
    await asyncio.sleep(1.0)
    shown = (await job_row(db, job.id))["progress"]
    await ctx.close()

    assert shown["value"] == 2 and shown["message"] == "running node 11"
