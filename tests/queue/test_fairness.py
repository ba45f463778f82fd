"""Owners take turns: one owner's backlog never starves another owner's job; optional limits.

The claim orders pending rows by priority, then turn, then age. A job's turn is set at INSERT
(imagen.jobs_take_turn): an owner with nothing live goes just before the head of the queue,
an owner with live jobs goes after its own latest. Limits: live jobs per owner for web
inserts (imagen.settings, enforced in the database), running jobs per owner across the fleet
(worker.max_running_per_owner, enforced by the claim).
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import asyncpg
import pytest

from imagen_worker.queries import sql
from imagen_worker.queue.jobs import Job, JobSpec, Queue
from tests.db.test_rls import request_as
from tests.queue.plans import explain, node_types, relations_read_in_full, subplan

A, B, C = (uuid.UUID(f"00000000-0000-4000-8000-00000000000{n}") for n in "abc")


async def enqueue(db: asyncpg.Pool, owner: uuid.UUID, n: int = 1, **fields: object) -> list[uuid.UUID]:
    specs = [JobSpec(owner_user_id=owner, prompt=f"{owner} #{i}", **fields) for i in range(n)]  # type: ignore[arg-type]
    return [(await Queue(db).enqueue(spec))[0] for spec in specs]


async def claim_one(queue: Queue, **kw: object) -> Job | None:
    jobs = await queue.claim("mock", is_default=True, limit=1, lease_seconds=30.0, **kw)  # type: ignore[arg-type]
    return jobs[0] if jobs else None


async def finish(db: asyncpg.Pool, job: Job) -> None:
    await db.execute(
        "UPDATE imagen.jobs SET status = 'failed', lease_expires_at = NULL, error = 'x' WHERE id = $1", job.id
    )


@pytest.fixture
async def limit_live_jobs(db: asyncpg.Pool) -> AsyncIterator[None]:
    await db.execute("UPDATE imagen.settings SET max_live_jobs_per_owner = 3")
    yield
    await db.execute("UPDATE imagen.settings SET max_live_jobs_per_owner = NULL")


async def test_an_owners_single_job_waits_for_at_most_the_job_already_running(db: asyncpg.Pool) -> None:
    await enqueue(db, A, 50)
    queue = Queue(db, uuid.uuid4())
    running = await claim_one(queue)
    assert running is not None and running.owner_user_id == A

    (bs_job,) = await enqueue(db, B)
    await finish(db, running)
    nxt = await claim_one(queue)

    assert nxt is not None and nxt.id == bs_job, "B's job is next, not after A's 49 others"


async def test_owners_with_backlogs_alternate_and_each_owner_keeps_its_own_order(db: asyncpg.Pool) -> None:
    a_jobs = await enqueue(db, A, 4)
    b_jobs = await enqueue(db, B, 4)
    queue = Queue(db, uuid.uuid4())

    order = [job.id for job in await queue.claim("mock", is_default=True, limit=8, lease_seconds=30)]
    owners = [A if job_id in a_jobs else B for job_id in order]

    assert owners == [A, B, A, B, A, B, A, B]
    assert [j for j in order if j in a_jobs] == a_jobs and [j for j in order if j in b_jobs] == b_jobs


async def test_newcomers_are_served_first_come_first_served(db: asyncpg.Pool) -> None:
    await enqueue(db, A, 20)
    (b,) = await enqueue(db, B)
    (c,) = await enqueue(db, C)
    queue = Queue(db, uuid.uuid4())

    order = [job.id for job in await queue.claim("mock", is_default=True, limit=4, lease_seconds=30)]

    assert order.index(b) < order.index(c) <= 3


async def test_priority_still_comes_before_turns(db: asyncpg.Pool) -> None:
    await enqueue(db, A, 5)
    (urgent,) = await enqueue(db, A, priority=10)
    queue = Queue(db, uuid.uuid4())
    first = await claim_one(queue)
    assert first is not None and first.id == urgent


async def test_max_running_per_owner_holds_across_workers_and_batches(db: asyncpg.Pool) -> None:
    await enqueue(db, A, 10)
    (bs_job,) = await enqueue(db, B)
    one, two = Queue(db, uuid.uuid4()), Queue(db, uuid.uuid4())

    first = await one.claim("mock", is_default=True, limit=5, lease_seconds=30, max_running_per_owner=2)
    second = await two.claim("mock", is_default=True, limit=5, lease_seconds=30, max_running_per_owner=2)

    assert sorted(str(j.owner_user_id) for j in first) == sorted([str(A), str(A), str(B)])
    assert second == [], "A is at its limit and B has nothing left"
    await finish(db, next(j for j in first if j.owner_user_id == A))
    third = await two.claim("mock", is_default=True, limit=5, lease_seconds=30, max_running_per_owner=2)
    assert [j.owner_user_id for j in third] == [A]
    assert bs_job in {j.id for j in first}


async def test_max_running_per_owner_holds_when_workers_claim_at_the_same_moment(db: asyncpg.Pool) -> None:
    await enqueue(db, A, 12)
    workers = [Queue(db, uuid.uuid4()) for _ in range(3)]
    for _ in range(5):
        claims = await asyncio.gather(
            *(
                w.claim("mock", is_default=True, limit=4, lease_seconds=30, max_running_per_owner=2)
                for w in workers
            )
        )
        running = await db.fetchval("SELECT count(*) FROM imagen.jobs WHERE status = 'running'")
        assert sum(len(c) for c in claims) == running == 2, "each claim sees the others' rows"
        for job in (job for claim in claims for job in claim):
            await finish(db, job)


async def test_a_web_user_past_the_live_job_limit_is_refused_in_words(
    db: asyncpg.Pool, limit_live_jobs: None
) -> None:
    async with request_as(db, "authenticated", A) as conn:
        for _ in range(3):
            await conn.execute("INSERT INTO imagen.jobs (owner_user_id, prompt) VALUES ($1, 'p')", A)
    with pytest.raises(asyncpg.CheckViolationError, match="too many live jobs: you already have 3") as caught:
        async with request_as(db, "authenticated", A) as conn:
            await conn.execute("INSERT INTO imagen.jobs (owner_user_id, prompt) VALUES ($1, 'p')", A)

    assert caught.value.hint == "wait for some to finish or cancel some, then submit again"
    assert await db.fetchval("SELECT count(*) FROM imagen.jobs") == 3
    async with request_as(db, "authenticated", B) as conn:
        await conn.execute("INSERT INTO imagen.jobs (owner_user_id, prompt) VALUES ($1, 'p')", B)


async def test_a_finished_or_cancelled_job_frees_its_slot(db: asyncpg.Pool, limit_live_jobs: None) -> None:
    async with request_as(db, "authenticated", A) as conn:
        ids = [
            await conn.fetchval(
                "INSERT INTO imagen.jobs (owner_user_id, prompt) VALUES ($1, 'p') RETURNING id", A
            )
            for _ in range(3)
        ]
        await conn.execute("UPDATE imagen.jobs SET cancel_requested = true WHERE id = $1", ids[0])
        await conn.execute("INSERT INTO imagen.jobs (owner_user_id, prompt) VALUES ($1, 'p')", A)
    assert await db.fetchval("SELECT count(*) FROM imagen.jobs WHERE status = 'pending'") == 3


async def test_concurrent_inserts_cannot_both_take_the_last_slot(
    db: asyncpg.Pool, limit_live_jobs: None
) -> None:
    await enqueue(db, A, 2)

    async def insert() -> bool:
        try:
            async with request_as(db, "authenticated", A) as conn:
                await conn.execute("INSERT INTO imagen.jobs (owner_user_id, prompt) VALUES ($1, 'p')", A)
                await asyncio.sleep(0.2)  # hold the transaction open across the other insert
            return True
        except asyncpg.CheckViolationError:
            return False

    results = await asyncio.gather(insert(), insert())

    assert sorted(results) == [False, True]
    assert await db.fetchval("SELECT count(*) FROM imagen.jobs") == 3


async def test_the_live_job_limit_says_nothing_about_another_owner(
    db: asyncpg.Pool, limit_live_jobs: None
) -> None:
    await enqueue(db, B, 3)  # B is at the limit
    for owner in (B, C):  # A names B (at the limit) and C (below it): the same refusal
        with pytest.raises(asyncpg.InsufficientPrivilegeError, match="row-level security"):
            async with request_as(db, "authenticated", A) as conn:
                await conn.execute("INSERT INTO imagen.jobs (owner_user_id, prompt) VALUES ($1, 'p')", owner)


@pytest.fixture
async def limit_jobs_per_hour(db: asyncpg.Pool) -> AsyncIterator[None]:
    await db.execute("UPDATE imagen.settings SET max_jobs_per_owner_per_hour = 3")
    yield
    await db.execute("UPDATE imagen.settings SET max_jobs_per_owner_per_hour = NULL")


async def test_cancelled_jobs_count_against_the_hourly_limit(
    db: asyncpg.Pool, limit_jobs_per_hour: None
) -> None:
    async with request_as(db, "authenticated", A) as conn:
        for _ in range(3):  # insert and cancel at once: never more than one live job
            job_id = await conn.fetchval(
                "INSERT INTO imagen.jobs (owner_user_id, prompt) VALUES ($1, 'p') RETURNING id", A
            )
            await conn.execute("UPDATE imagen.jobs SET cancel_requested = true WHERE id = $1", job_id)
    with pytest.raises(asyncpg.CheckViolationError) as caught:
        async with request_as(db, "authenticated", A) as conn:
            await conn.execute("INSERT INTO imagen.jobs (owner_user_id, prompt) VALUES ($1, 'p')", A)

    assert caught.value.args[0] == "too many jobs: you submitted 3 in the last hour, the limit is 3"
    assert caught.value.hint == "submit again later"
    async with request_as(db, "authenticated", B) as conn:
        await conn.execute("INSERT INTO imagen.jobs (owner_user_id, prompt) VALUES ($1, 'p')", B)
    await db.execute(
        "UPDATE imagen.jobs SET created_at = now() - interval '61 minutes' WHERE owner_user_id = $1", A
    )
    async with request_as(db, "authenticated", A) as conn:
        await conn.execute("INSERT INTO imagen.jobs (owner_user_id, prompt) VALUES ($1, 'p')", A)
    await enqueue(db, A, 5)  # the operator is not limited
    assert await db.fetchval("SELECT count(*) FROM imagen.jobs WHERE owner_user_id = $1", A) == 9


async def test_the_operator_is_not_limited(db: asyncpg.Pool, limit_live_jobs: None) -> None:
    await enqueue(db, A, 5)
    assert await db.fetchval("SELECT count(*) FROM imagen.jobs") == 5


async def test_a_user_cannot_choose_their_turn(db: asyncpg.Pool) -> None:
    with pytest.raises(asyncpg.InsufficientPrivilegeError, match="permission denied"):
        async with request_as(db, "authenticated", A) as conn:
            await conn.execute(
                "INSERT INTO imagen.jobs (owner_user_id, prompt, turn) VALUES ($1, 'p', -1000)", A
            )


@pytest.mark.parametrize("plan_cache_mode", ["force_custom_plan", "force_generic_plan"])
@pytest.mark.parametrize("max_running_per_owner", [None, 2])
async def test_one_owners_long_backlog_is_claimed_through_the_index_not_read_in_full(
    db: asyncpg.Pool, plan_cache_mode: str, max_running_per_owner: int | None
) -> None:
    # A terminal user's hundred thousand prompts are one owner's: the planner must not take
    # "skip owners at their limit" for a filter that rejects nearly every row of that owner.
    await db.execute(
        "INSERT INTO imagen.jobs (owner_user_id, prompt) SELECT $1, 'p' || g FROM generate_series(1, 5000) g",
        A,
    )
    await db.execute("ANALYZE imagen.jobs")
    async with db.acquire() as conn:
        plan = await explain(
            conn, sql("claim"), uuid.uuid4(), "mock", True, [], 16, 30.0, 0.0, [], max_running_per_owner,
            plan_cache_mode=plan_cache_mode,
        )  # fmt: skip

    assert "jobs" not in relations_read_in_full(plan)
    # Nor read through another index and sorted: the first rows of the claim index are the answer.
    assert "Sort" not in node_types(subplan(plan, "CTE defaults"))
