"""Completions recorded together: one statement for many jobs, each still fenced on its own."""

from __future__ import annotations

import asyncio
import uuid

import asyncpg
import pytest

from imagen_worker.errors import LeaseLost, TerminalError
from imagen_worker.queue.batch import CompletionBatcher
from imagen_worker.queue.jobs import ImageRecord, Job
from tests.queue.test_jobs import claim, enqueue, expire_leases, image, worker


async def statuses(db: asyncpg.Pool, jobs: list[Job]) -> dict[uuid.UUID, str]:
    ids = [j.id for j in jobs]
    rows = await db.fetch("SELECT id, status FROM imagen.jobs WHERE id = ANY($1::uuid[])", ids)
    return {row["id"]: row["status"] for row in rows}


async def test_complete_many_records_every_job_and_its_image_in_one_statement(db: asyncpg.Pool) -> None:
    for _ in range(5):
        await enqueue(db)
    queue = worker(db)
    jobs = await claim(queue, limit=5)
    outcomes = await queue.complete_many([(job, image(job)) for job in jobs])
    assert all(o.fenced and o.image_id is not None for o in outcomes)
    assert set((await statuses(db, jobs)).values()) == {"done"}
    linked = await db.fetchval(
        "SELECT count(*) FROM imagen.jobs j JOIN imagen.images i ON i.id = j.image_id AND i.job_id = j.id "
        "JOIN imagen.image_internals n ON n.image_id = i.id WHERE j.id = ANY($1::uuid[])",
        [j.id for j in jobs],
    )
    assert linked == 5


async def test_a_job_whose_lease_was_lost_does_not_poison_the_others(db: asyncpg.Pool) -> None:
    for _ in range(3):
        await enqueue(db)
    old = worker(db)
    lost, *kept = await claim(old, limit=3)
    await db.execute(
        "UPDATE imagen.jobs SET lease_expires_at = now() - interval '1 second' WHERE id = $1", lost.id
    )
    (retaken,) = await claim(worker(db), limit=1)
    assert retaken.id == lost.id
    outcomes = await old.complete_many([(job, image(job)) for job in (lost, *kept)])
    assert outcomes[0].fenced is False and outcomes[0].image_id is None
    assert all(o.fenced and o.image_id for o in outcomes[1:])
    now = await statuses(db, [lost, *kept])
    assert now[lost.id] == "running" and all(now[j.id] == "done" for j in kept)
    assert await db.fetchval("SELECT count(*) FROM imagen.images WHERE job_id = $1", lost.id) == 0


async def test_batcher_groups_completions_that_arrive_while_a_write_is_in_flight(db: asyncpg.Pool) -> None:
    for _ in range(20):
        await enqueue(db)
    queue = worker(db)
    jobs = await claim(queue, limit=20)
    batcher = CompletionBatcher(queue)
    calls: list[int] = []
    original = queue.complete_many

    async def counting(items: list[tuple[Job, ImageRecord]]) -> object:
        calls.append(len(items))
        return await original(items)

    queue.complete_many = counting  # type: ignore[assignment,method-assign]
    ids = await asyncio.gather(*(batcher.complete(job, image(job)) for job in jobs))
    assert len(set(ids)) == 20 and sum(calls) == 20
    assert len(calls) < 20, "completions arriving together share a statement"
    assert set((await statuses(db, jobs)).values()) == {"done"}


async def test_batcher_raises_lease_lost_only_for_the_job_that_lost_it(db: asyncpg.Pool) -> None:
    for _ in range(2):
        await enqueue(db)
    old = worker(db)
    jobs = await claim(old, limit=2)
    await expire_leases(db)
    await claim(worker(db), limit=1)  # re-takes the one with the oldest lease
    batcher = CompletionBatcher(old)
    results = await asyncio.gather(*(batcher.complete(j, image(j)) for j in jobs), return_exceptions=True)
    assert sum(isinstance(r, LeaseLost) for r in results) == 1
    assert sum(isinstance(r, uuid.UUID) for r in results) == 1


async def test_batcher_reports_a_conflicting_images_row_like_the_single_path(db: asyncpg.Pool) -> None:
    for _ in range(2):
        await enqueue(db)
    queue = worker(db)
    first, second = await claim(queue, limit=2)
    taken = ImageRecord(**{**image(second).__dict__, "storage_path": image(first).storage_path})
    batcher = CompletionBatcher(queue)
    results = await asyncio.gather(
        batcher.complete(first, image(first)), batcher.complete(second, taken), return_exceptions=True
    )
    assert isinstance(results[0], uuid.UUID)
    assert isinstance(results[1], TerminalError) and "storage path is taken" in results[1].message
    assert (await statuses(db, [second]))[second.id] == "running"


async def test_a_database_error_reaches_every_waiting_job(db: asyncpg.Pool) -> None:
    await enqueue(db)
    queue = worker(db)
    (job,) = await claim(queue, limit=1)
    batcher = CompletionBatcher(queue)

    async def broken(items: object) -> object:
        raise asyncpg.ConnectionDoesNotExistError("connection was closed in the middle of operation")

    queue.complete_many = broken  # type: ignore[assignment,method-assign]
    with pytest.raises(asyncpg.ConnectionDoesNotExistError):
        await batcher.complete(job, image(job))
    assert (await statuses(db, [job]))[job.id] == "running"
