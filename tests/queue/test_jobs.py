"""The job state machine: claims, leases, fenced transitions."""

from __future__ import annotations

import asyncio
import uuid

import asyncpg
import pytest

from imagen_worker.errors import BackendUnavailable, ConfigError, LeaseLost, RetryableError, TerminalError
from imagen_worker.queries import sql
from imagen_worker.queue.jobs import ImageRecord, Job, JobSpec, Outcome, Queue, Renewal, backoff_seconds
from tests.queue.plans import explain, node_types, relations_read_in_full, subplan

OWNER = uuid.UUID("00000000-0000-4000-8000-000000000003")


def worker(db: asyncpg.Pool) -> Queue:
    return Queue(db, uuid.uuid4())


async def enqueue(db: asyncpg.Pool, **fields: object) -> uuid.UUID:
    job_id, _ = await Queue(db).enqueue(JobSpec(owner_user_id=OWNER, prompt="p", **fields))  # type: ignore[arg-type]
    return job_id


async def claim(queue: Queue, backend: str = "mock", limit: int = 10, **kw: object) -> list[Job]:
    opts = {"is_default": True, "lease_seconds": 30.0, **kw}
    return await queue.claim(backend, limit=limit, **opts)  # type: ignore[arg-type]


def image(job: Job) -> ImageRecord:
    return ImageRecord(
        storage_path=f"x/{job.id}.png", mime_type="image/png", bytes=1, sha256="0" * 64,
        backend="mock", seed=1, latency_ms=1, sidecar={},
    )  # fmt: skip


async def expire_leases(db: asyncpg.Pool) -> None:
    await db.execute(
        "UPDATE imagen.jobs SET lease_expires_at = now() - interval '1 second' WHERE status = 'running'"
    )


async def test_claim_takes_at_most_the_free_capacity(db: asyncpg.Pool) -> None:
    for _ in range(5):
        await enqueue(db)
    jobs = await claim(worker(db), limit=3)
    assert len(jobs) == 3
    assert all(job.attempts == 1 for job in jobs)
    assert await db.fetchval("SELECT count(*) FROM imagen.jobs WHERE status = 'pending'") == 2


async def test_two_workers_never_claim_the_same_job(db: asyncpg.Pool) -> None:
    for _ in range(20):
        await enqueue(db)
    a, b = worker(db), worker(db)
    first, second = await claim(a, limit=12), await claim(b, limit=12)
    assert len(first) == 12 and len(second) == 8
    assert not {j.id for j in first} & {j.id for j in second}


async def test_claim_serves_only_its_backend_and_null_means_the_default(db: asyncpg.Pool) -> None:
    mine = await enqueue(db, backend="gpu-a")
    default = await enqueue(db)
    other = await enqueue(db, backend="gpu-b")
    as_default = {j.id for j in await claim(worker(db), "gpu-a", is_default=True)}
    assert as_default == {mine, default}
    assert await db.fetchval("SELECT status FROM imagen.jobs WHERE id = $1", other) == "pending"


async def test_a_backend_no_live_worker_serves_is_claimed_as_an_orphan_to_fail_it(db: asyncpg.Pool) -> None:
    served_elsewhere = await enqueue(db, backend="gpu-b")
    orphan = await enqueue(db, backend="typo")
    elsewhere = Queue(db, uuid.uuid4())
    await elsewhere.register("host-b", 1, ["gpu-b"], ttl=60)
    me = worker(db)
    orphans = await me.orphan_backends()
    assert orphans == ["typo"]
    claimed = {j.id for j in await claim(me, "mock", orphans=orphans)}
    assert claimed == {orphan}
    assert await db.fetchval("SELECT status FROM imagen.jobs WHERE id = $1", served_elsewhere) == "pending"


async def test_a_cleanly_stopped_worker_keeps_its_backends_served_for_orphan_after(db: asyncpg.Pool) -> None:
    await enqueue(db, backend="slow")
    restarting = Queue(db, uuid.uuid4())
    await restarting.register("host-a", 1, ["slow"], ttl=60, default_backend="slow")
    await restarting.unregister()

    row = await db.fetchrow("SELECT stopped_at, expires_at <= now() AS ended FROM imagen.workers")
    assert row["stopped_at"] is not None and row["ended"], "the entry stays, marked stopped"
    (unserved,) = await worker(db).unserved_backends()
    assert unserved.backend == "slow" and unserved.seconds is not None and unserved.seconds < 5
    assert await worker(db).orphan_backends(after=600) == [], "a restart is a gap, not an abandonment"
    assert await worker(db).orphan_backends(after=0) == ["slow"]


async def test_only_jobs_that_waited_orphan_after_are_claimed_as_orphans(db: asyncpg.Pool) -> None:
    fresh = await enqueue(db, backend="typo")
    old = await enqueue(db, backend="typo")
    await db.execute("UPDATE imagen.jobs SET run_at = now() - interval '11 minutes' WHERE id = $1", old)
    claimed = await claim(worker(db), "mock", orphans=["typo"], orphan_after=600)
    assert [j.id for j in claimed] == [old]
    assert await db.fetchval("SELECT status FROM imagen.jobs WHERE id = $1", fresh) == "pending"


async def test_waiting_reasons_are_written_bounded_and_cleared_by_the_claim(db: asyncpg.Pool) -> None:
    jobs = [await enqueue(db, backend="slow") for _ in range(3)]
    queue = worker(db)
    waiting = {"state": "waiting", "reason": "no_worker", "message": "no worker serves backend 'slow' yet"}
    assert await queue.mark_waiting("slow", waiting, limit=2) == 2
    assert await queue.mark_waiting("slow", waiting, limit=2) == 1, "rows already saying so are skipped"
    assert await queue.mark_waiting("slow", waiting, limit=2) == 0
    progress = await db.fetch("SELECT progress FROM imagen.jobs WHERE id = ANY($1)", jobs)
    assert all(row["progress"] == waiting for row in progress)

    (claimed, *_) = await claim(queue, "slow", limit=1)
    assert await db.fetchval("SELECT progress FROM imagen.jobs WHERE id = $1", claimed.id) is None
    assert await queue.clear_waiting("slow", "no_worker") == 2
    assert await db.fetchval("SELECT count(*) FROM imagen.jobs WHERE progress IS NOT NULL") == 0


async def test_waiting_reasons_go_in_claim_order_turns_included(db: asyncpg.Pool) -> None:
    other = uuid.UUID("00000000-0000-4000-8000-000000000004")
    mine = [await enqueue(db, backend="slow") for _ in range(3)]
    (theirs, _) = await Queue(db).enqueue(JobSpec(owner_user_id=other, prompt="p", backend="slow"))
    waiting = {"state": "waiting", "reason": "no_worker", "message": "no worker serves backend 'slow' yet"}

    assert await worker(db).mark_waiting("slow", waiting, limit=2) == 2

    marked = await db.fetch("SELECT id FROM imagen.jobs WHERE progress IS NOT NULL")
    assert {row["id"] for row in marked} == {mine[0], theirs}, "the next two claims take these two"


@pytest.mark.parametrize("plan_cache_mode", ["force_custom_plan", "force_generic_plan"])
async def test_marking_waiting_reasons_walks_the_claim_index_not_the_whole_backlog(
    db: asyncpg.Pool, plan_cache_mode: str
) -> None:
    # It runs every poll interval while a backend is down: exactly when the backlog grows.
    await db.execute(
        "INSERT INTO imagen.jobs (owner_user_id, prompt, backend) "
        "SELECT gen_random_uuid(), 'p', CASE WHEN g % 2 = 0 THEN 'gpu' END FROM generate_series(1, 5000) g"
    )
    await db.execute("ANALYZE imagen.jobs")
    waiting = {"state": "waiting", "reason": "backend_unavailable", "message": "down"}
    async with db.acquire() as conn:
        plan = await explain(
            conn, sql("mark_waiting"), "gpu", True, waiting, 100, plan_cache_mode=plan_cache_mode
        )

    for branch in ("CTE named", "CTE defaults"):
        assert relations_read_in_full(subplan(plan, branch)) == [], branch


def _over_jobs(name: str, me: uuid.UUID, jobs: list[Job]) -> tuple[object, ...]:
    ids, attempts = [j.id for j in jobs], [j.attempts for j in jobs]
    if name == "complete_batch":
        return (me, [], len(jobs))
    if name == "heartbeat":
        return (me, 30.0, ids, attempts)
    return (me, ids, attempts)


@pytest.mark.parametrize("name", ["complete_batch", "heartbeat", "cancel_requested", "release"])
async def test_statements_over_a_list_of_jobs_look_each_run_record_up_by_its_key(
    db: asyncpg.Pool, name: str
) -> None:
    # Planned while the run records are few and kept in the statement cache, a plan that read
    # them all would read them all at every call once they are many.
    me = uuid.uuid4()
    # The history a worker leaves: jobs that ran and ended (their running versions stay in
    # the running index until a vacuum).
    await db.execute(
        "INSERT INTO imagen.jobs (owner_user_id, prompt, status, attempts, lease_expires_at)"
        " SELECT gen_random_uuid(), 'p', 'running', 1, now() FROM generate_series(1, 1000)"
    )
    await db.execute(
        "UPDATE imagen.jobs SET status = 'failed', error = 'e', lease_expires_at = NULL, finished_at = now()"
    )
    for _ in range(3):
        await enqueue(db)
    jobs = await claim(Queue(db, me))
    async with db.acquire() as conn:
        plan = await explain(
            conn, sql(name), *_over_jobs(name, me, jobs), plan_cache_mode="force_generic_plan"
        )

    assert "job_runs" not in relations_read_in_full(plan)
    if name == "complete_batch":
        assert "Bitmap Heap Scan" not in node_types(subplan(plan, "CTE fenced")), "jobs by their key"


async def test_the_claim_never_retakes_an_expired_job_its_worker_still_holds(db: asyncpg.Pool) -> None:
    await enqueue(db)
    queue = worker(db)
    (job,) = await claim(queue)
    await expire_leases(db)
    assert await claim(queue, held=[job.id]) == [], "still running here: not a second execution"
    (again,) = await claim(queue, held=[])
    assert again.id == job.id and again.attempts == 2, "let go of: recoverable even by a lone worker"


async def test_claim_retakes_a_running_job_whose_lease_expired(db: asyncpg.Pool) -> None:
    await enqueue(db)
    (first,) = await claim(worker(db))
    assert await claim(worker(db)) == [], "a live lease is never taken"
    await expire_leases(db)
    (again,) = await claim(worker(db))
    assert again.id == first.id and again.attempts == 2


async def test_the_old_owner_of_a_retaken_job_can_write_nothing(db: asyncpg.Pool) -> None:
    await enqueue(db)
    old = worker(db)
    (stale,) = await claim(old)
    await expire_leases(db)
    new = worker(db)
    (fresh,) = await claim(new)

    with pytest.raises(LeaseLost):
        await old.complete(stale, image(stale))
    with pytest.raises(LeaseLost):
        await old.fail(stale, "late failure")
    with pytest.raises(LeaseLost):
        await old.record_error(stale, RetryableError("late blip"), base=1, cap=1)
    with pytest.raises(LeaseLost):
        await old.set_backend_ref(stale, "ref")
    assert await db.fetchval("SELECT count(*) FROM imagen.images") == 0

    await new.complete(fresh, image(fresh))
    row = await db.fetchrow("SELECT status, image_id, error FROM imagen.jobs WHERE id = $1", fresh.id)
    assert row["status"] == "done" and row["image_id"] is not None and row["error"] is None


async def test_completing_twice_creates_no_second_image_and_says_why(db: asyncpg.Pool) -> None:
    await enqueue(db)
    queue = worker(db)
    (job,) = await claim(queue)
    await queue.complete(job, image(job))
    with pytest.raises(TerminalError, match="already has an image: another attempt finished it"):
        await queue.complete(job, image(job))
    assert await db.fetchval("SELECT count(*) FROM imagen.images") == 1


async def test_heartbeat_renews_own_leases_and_reports_cancel_requests(db: asyncpg.Pool) -> None:
    await enqueue(db)
    await enqueue(db)
    mine, theirs = worker(db), worker(db)
    (a,) = await claim(mine, limit=1)
    (b,) = await claim(theirs, limit=1)
    await db.execute("UPDATE imagen.jobs SET cancel_requested = true WHERE id = $1", a.id)
    renewed = await mine.heartbeat([a.key, b.key], lease_seconds=120)
    assert renewed == {
        a.key: Renewal(renewed=True, ours=True, cancel_requested=True),
        b.key: Renewal(renewed=False, ours=False, cancel_requested=False),
    }, "only own jobs are renewed; the cancel flag rides along"
    remaining = await db.fetchval(
        "SELECT extract(epoch FROM lease_expires_at - now()) FROM imagen.jobs WHERE id = $1", a.id
    )
    assert 100 < remaining <= 120


async def test_heartbeat_is_fenced_on_the_attempt(db: asyncpg.Pool) -> None:
    await enqueue(db)
    queue = worker(db)
    (first,) = await claim(queue)
    await expire_leases(db)
    (second,) = await claim(queue)  # the same worker, a later attempt
    renewed = await queue.heartbeat([first.key], lease_seconds=120)
    assert renewed[first.key] == Renewal(renewed=False, ours=False, cancel_requested=False)
    expired = await db.fetchval("SELECT lease_expires_at < now() + interval '60 s' FROM imagen.jobs")
    assert expired, "an old attempt's heartbeat does not keep the new attempt's lease alive"
    assert (await queue.heartbeat([second.key], lease_seconds=120))[second.key].renewed


async def test_heartbeat_skips_a_row_locked_by_another_session_and_renews_the_rest(
    db: asyncpg.Pool, database_url: str
) -> None:
    await enqueue(db)
    await enqueue(db)
    queue = worker(db)
    locked, free = await claim(queue, limit=2)
    holder = await asyncpg.connect(database_url)
    try:
        async with holder.transaction():
            await holder.execute("SELECT * FROM imagen.jobs WHERE id = $1 FOR UPDATE", locked.id)
            renewed = await asyncio.wait_for(queue.heartbeat([locked.key, free.key], 120), timeout=2)
    finally:
        await holder.close()
    assert renewed[locked.key] == Renewal(renewed=False, ours=True, cancel_requested=False)
    assert renewed[free.key].renewed


async def test_retryable_errors_go_back_to_pending_with_backoff(db: asyncpg.Pool) -> None:
    await enqueue(db, max_attempts=3)
    queue = worker(db)
    (job,) = await claim(queue)
    outcome = await queue.record_error(job, RetryableError("blip", detail={"code": 503}), base=10, cap=60)
    row = await db.fetchrow(
        "SELECT status, error, error_detail, extract(epoch FROM run_at - now()) AS delay"
        " FROM imagen.jobs JOIN imagen.job_runs ON job_id = id"
    )
    assert outcome is Outcome.RETRIED and row["status"] == "pending" and row["error"] == "blip"
    assert 5 <= row["delay"] <= 10
    assert row["error_detail"]["code"] == 503 and row["error_detail"]["attempt"] == 1


async def test_terminal_errors_fail_at_once(db: asyncpg.Pool) -> None:
    await enqueue(db, max_attempts=5)
    queue = worker(db)
    (job,) = await claim(queue)
    assert await queue.record_error(job, TerminalError("width must be 64..4096"), base=1, cap=1) == "failed"
    row = await db.fetchrow("SELECT status, error, finished_at FROM imagen.jobs")
    assert row["status"] == "failed" and row["error"] == "width must be 64..4096" and row["finished_at"]


async def test_release_returns_jobs_without_spending_an_attempt_and_wakes_workers(
    db: asyncpg.Pool, database_url: str
) -> None:
    await enqueue(db)
    queue = worker(db)
    (job,) = await claim(queue)
    listener = await asyncpg.connect(database_url)
    heard: list[str] = []
    await listener.add_listener("imagen_jobs", lambda *args: heard.append(args[3]))
    try:
        assert await queue.release([job.key]) == 1
        await listener.execute("SELECT 1")
    finally:
        await listener.close()
    row = await db.fetchrow("SELECT status, attempts FROM imagen.jobs")
    assert row["status"] == "pending" and row["attempts"] == 0
    assert heard, "released jobs are announced so another worker takes them at once"


async def test_a_claim_says_whether_an_earlier_attempt_ran_even_one_that_spent_none(db: asyncpg.Pool) -> None:
    # An earlier attempt may have left files on this host to reuse; a first claim cannot have.
    await enqueue(db)
    queue = worker(db)
    (first,) = await claim(queue)
    assert first.ran_before is False
    await queue.release([first.key])
    (released,) = await claim(queue)
    assert released.attempts == 1 and released.ran_before is True
    await expire_leases(db)
    (retaken,) = await claim(worker(db))
    assert retaken.attempts == 2 and retaken.ran_before is True


@pytest.mark.parametrize("back", ["retried", "requeued for an outage", "released", "recovered at boot"])
async def test_a_job_back_to_pending_leaves_its_attempts_progress_behind(db: asyncpg.Pool, back: str) -> None:
    await enqueue(db, max_attempts=3)
    queue = worker(db)
    (job,) = await claim(queue)
    await queue.set_progress(job, {"value": 3, "max": 4, "percent": 75.0})
    if back == "retried":
        await queue.record_error(job, RetryableError("blip"), base=10, cap=60)
    elif back == "requeued for an outage":
        await queue.record_error(job, BackendUnavailable("down"), base=10, cap=60, max_outage_requeues=3)
    elif back == "released":
        await queue.release([job.key])
    else:
        await expire_leases(db)
        await worker(db).requeue_expired()
    row = await db.fetchrow("SELECT status, progress FROM imagen.jobs")
    assert (row["status"], row["progress"]) == ("pending", None), "not step 3 of 4 of a render that stopped"


async def test_boot_recovery_requeues_only_expired_leases(db: asyncpg.Pool) -> None:
    await enqueue(db)
    await enqueue(db)
    queue = worker(db)
    jobs = await claim(queue, limit=2)
    await db.execute(
        "UPDATE imagen.jobs SET lease_expires_at = now() - interval '1 second' WHERE id = $1", jobs[0].id
    )
    assert await worker(db).requeue_expired() == 1
    statuses = dict(await db.fetch("SELECT id, status FROM imagen.jobs"))
    assert statuses == {jobs[0].id: "pending", jobs[1].id: "running"}


async def test_an_operator_retry_gives_a_failed_job_fresh_attempts(db: asyncpg.Pool) -> None:
    job_id = await enqueue(db)
    queue = worker(db)
    (job,) = await claim(queue)
    await queue.set_backend_ref(job, "prompt-1@http://gpu:8188")
    await queue.fail(job, "boom")
    assert await Queue(db).retry(job_id)
    row = await db.fetchrow("SELECT status, attempts, error FROM imagen.jobs")
    assert (row["status"], row["attempts"], row["error"]) == ("pending", 0, None)
    (again,) = await claim(queue)
    # A ref that names no submission: nothing earlier is adopted, the job is rendered again.
    assert again.backend_ref == "retried by an operator" and again.ran_before
    assert not await Queue(db).retry(job_id), "only failed or cancelled jobs can be retried"


@pytest.mark.parametrize("attempt", [1, 2, 5, 20])
def test_backoff_grows_exponentially_with_jitter_and_a_cap(attempt: int) -> None:
    delays = [backoff_seconds(attempt, base=2, cap=60) for _ in range(200)]
    nominal = min(60, 2 * 2 ** (attempt - 1))
    assert all(nominal / 2 <= d <= nominal for d in delays)
    assert len(set(delays)) > 1, "jitter spreads retries of a failed batch"


async def test_dedupe_keys_belong_to_their_owner(db: asyncpg.Pool) -> None:
    queue = Queue(db)
    mine, _ = await queue.enqueue(JobSpec(owner_user_id=OWNER, prompt="a", dedupe_key="k"))
    theirs, created = await queue.enqueue(JobSpec(owner_user_id=uuid.uuid4(), prompt="b", dedupe_key="k"))
    assert created and theirs != mine


async def test_an_operator_retry_that_would_clash_with_a_live_dedupe_key_says_so(db: asyncpg.Pool) -> None:
    queue = worker(db)
    first = await enqueue(db, dedupe_key="nightly")
    (job,) = await claim(queue)
    await queue.fail(job, "boom")
    await enqueue(db, dedupe_key="nightly")
    with pytest.raises(ConfigError, match="holds its dedupe_key"):
        await Queue(db).retry(first)


async def test_a_cancel_is_written_only_when_the_row_asks_for_it(db: asyncpg.Pool) -> None:
    await enqueue(db)
    queue = worker(db)
    (job,) = await claim(queue)
    with pytest.raises(LeaseLost):
        await queue.cancelled(job)
    assert await queue.cancel_requested([job.key]) == set()
    await queue.set_progress(job, {"percent": 33.3, "message": "running node 10"})
    await Queue(db).request_cancel(job.id)
    assert await queue.cancel_requested([job.key]) == {job.key}
    await queue.cancelled(job)
    row = await db.fetchrow("SELECT status, progress FROM imagen.jobs")
    assert (row["status"], row["progress"]) == ("cancelled", None), "no word of a render that stopped"


async def test_a_backend_outage_requeues_without_spending_an_attempt_up_to_a_cap(db: asyncpg.Pool) -> None:
    await enqueue(db, max_attempts=2)
    queue = worker(db)
    outage = BackendUnavailable("ComfyUI at http://gpu:8188 is unreachable")
    outcomes = []
    for _ in range(4):
        await db.execute("UPDATE imagen.jobs SET run_at = now() WHERE status = 'pending'")
        (job,) = await claim(queue)
        outcomes.append(await queue.record_error(job, outage, base=0.01, cap=0.01, max_outage_requeues=2))
    row = await db.fetchrow("SELECT status, attempts, outage_requeues, error FROM imagen.jobs")
    assert outcomes == [Outcome.REQUEUED, Outcome.REQUEUED, Outcome.RETRIED, Outcome.FAILED]
    assert row["outage_requeues"] == 2
    assert row["status"] == "failed" and row["attempts"] == 2, "past the cap an outage spends attempts"
    assert row["error"] == "ComfyUI is unreachable (gave up after 2 attempts)", "no internal address"
    detail = await db.fetchval("SELECT error_detail FROM imagen.job_runs")
    assert detail["message"] == "ComfyUI at http://gpu:8188 is unreachable (gave up after 2 attempts)"


async def test_boot_recovery_skips_rows_another_booting_worker_holds(
    db: asyncpg.Pool, database_url: str
) -> None:
    await enqueue(db)
    await enqueue(db)
    held, free = await claim(worker(db), limit=2)
    await expire_leases(db)
    other = await asyncpg.connect(database_url)
    try:
        async with other.transaction():
            await other.execute("SELECT 1 FROM imagen.jobs WHERE id = $1 FOR UPDATE", held.id)
            assert await asyncio.wait_for(worker(db).requeue_expired(), timeout=2) == 1
    finally:
        await other.close()
    statuses = dict(await db.fetch("SELECT id, status FROM imagen.jobs"))
    assert statuses == {held.id: "running", free.id: "pending"}
