"""The worker daemon: a row INSERTed into imagen.jobs becomes an image, reliably."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg

from imagen_worker.backends.base import GenerateRequest, GenerateResult, JobContext
from imagen_worker.backends.mock import MockBackend
from imagen_worker.queue.jobs import Job, JobSpec, Queue
from imagen_worker.worker.daemon import Worker
from tests.fakes.storage import FakeStorage
from tests.workers import eventually, image_row, insert_job, job_row, make_config, running_worker, terminal

OWNER = uuid.UUID("00000000-0000-4000-8000-000000000001")


async def insert(db: asyncpg.Pool, prompt: str = "a red fox", **columns: object) -> uuid.UUID:
    return await insert_job(db, prompt, owner_user_id=OWNER, **columns)


async def test_a_plain_sql_insert_becomes_an_image_file_sidecar_and_linked_row(
    db: asyncpg.Pool, database_url: str, tmp_path: Path
) -> None:
    config = make_config(tmp_path)
    async with running_worker(config, database_url):
        job_id = await insert(db, "a lighthouse at dawn")
        job = await terminal(db, job_id, within=2.0)

    assert job["status"] == "done", job["error"]
    image = await image_row(db, job["image_id"])
    assert image is not None and image["job_id"] == job_id
    local = Path(image["local_path"])
    assert local.is_file() and local.read_bytes().startswith(b"\x89PNG")
    assert local.stat().st_size == image["bytes"]
    sidecar = json.loads(Path(f"{local}.json").read_text())
    assert sidecar["job_id"] == str(job_id) and sidecar["sha256"] == image["sha256"]
    # Local storage: never a key that was not uploaded, never a host path (web users read it).
    assert image["storage_path"] == f"local:{OWNER}/{job_id}.png"


async def test_notify_picks_a_job_up_long_before_the_poll_would(
    db: asyncpg.Pool, database_url: str, tmp_path: Path
) -> None:
    config = make_config(tmp_path, worker={"poll_interval": 30})
    async with running_worker(config, database_url):
        await asyncio.sleep(0.2)  # the start-up drain is over; only NOTIFY can wake the worker now
        job_id = await insert(db)
        job = await terminal(db, job_id, within=5)
    pickup = (job["started_at"] - job["created_at"]).total_seconds()
    assert pickup < 0.5


async def test_a_killed_listener_reconnects_and_the_poll_still_picks_jobs_up(
    db: asyncpg.Pool, database_url: str, tmp_path: Path
) -> None:
    config = make_config(tmp_path, worker={"poll_interval": 0.5})
    async with running_worker(config, database_url) as worker:
        listener_pid = worker.listener.backend_pid
        await db.execute("SELECT pg_terminate_backend($1)", listener_pid)
        job_id = await insert(db)  # committed while nobody listens: its NOTIFY is lost
        job = await terminal(db, job_id, within=5)
        await eventually(lambda: _connected_again(worker, listener_pid), within=10)
    assert job["status"] == "done"
    assert worker.listener.reconnects >= 1


async def test_an_idle_worker_reads_an_empty_backlog_once_not_at_every_job_ending(
    db: asyncpg.Pool, database_url: str, tmp_path: Path
) -> None:
    config = make_config(tmp_path, worker={"poll_interval": 30, "concurrency": 2})
    async with running_worker(config, database_url) as worker:
        await asyncio.sleep(0.2)  # the start-up claim found the backlog empty
        claims = _count_claims(worker)
        jobs = []
        for i in range(5):
            jobs.append(await insert(db, f"one at a time {i}"))
            await terminal(db, jobs[-1], within=5)
        await asyncio.sleep(0.2)  # any wake-up the last job's ending caused is over
    statuses = [(await job_row(db, job))["status"] for job in jobs]
    assert statuses == ["done"] * len(jobs)
    # One claim per NOTIFY; a job settling or ending is no news about the backlog.
    assert claims.calls == len(jobs), f"{claims.calls} claims for {len(jobs)} jobs"


async def test_a_job_retried_later_runs_when_due_not_at_the_next_poll(
    db: asyncpg.Pool, database_url: str, tmp_path: Path
) -> None:
    config = make_config(tmp_path, worker={"poll_interval": 30, "retry_base_seconds": 0.05})
    async with running_worker(config, database_url):
        await asyncio.sleep(0.2)  # the start-up claim found the backlog empty
        job_id = await insert(db, params={"mock_fail": "retryable"}, max_attempts=2)
        job = await terminal(db, job_id, within=5)
    assert job["status"] == "failed" and job["attempts"] == 2


async def test_under_a_per_owner_cap_an_owners_next_job_starts_as_the_last_one_ends(
    db: asyncpg.Pool, database_url: str, tmp_path: Path
) -> None:
    config = make_config(
        tmp_path,
        backends={"mock": {"type": "mock", "latency_ms": 200}},
        worker={"poll_interval": 30, "concurrency": 2, "max_running_per_owner": 1},
    )
    async with running_worker(config, database_url):
        await asyncio.sleep(0.2)
        first, second = await insert(db, "first"), await insert(db, "second")
        rows = [await terminal(db, job, within=5) for job in (first, second)]
    assert [row["status"] for row in rows] == ["done", "done"]
    earlier, later = sorted(rows, key=lambda row: row["started_at"])
    assert later["started_at"] >= earlier["finished_at"], "one owner, one running job"


class _ClaimCounter:
    calls = 0


def _count_claims(worker: Worker) -> _ClaimCounter:
    """Counts the claim statements the worker sends (each still runs against the database)."""
    counter = _ClaimCounter()
    claim = worker.queue.claim

    async def counted(*args: Any, **kwargs: Any) -> list[Job]:
        counter.calls += 1
        return await claim(*args, **kwargs)

    worker.queue.claim = counted  # type: ignore[method-assign]
    return counter


async def _connected_again(worker: object, old_pid: int | None) -> bool:
    listener = worker.listener  # type: ignore[attr-defined]
    return bool(listener.connected and listener.backend_pid != old_pid)


async def test_bad_rows_fail_in_words_and_the_daemon_keeps_serving(
    db: asyncpg.Pool, database_url: str, tmp_path: Path
) -> None:
    config = make_config(tmp_path, worker={"orphan_after": 0.5})
    async with running_worker(config, database_url):
        unknown_backend = await insert(db, backend="no-such-backend")
        unknown_style = await insert(db, style="baroque-vaporwave")
        bad_param = await insert(db, params={"cfg_scale": 7})
        good = await insert(db, "still works")
        results = {job: await terminal(db, job) for job in (unknown_backend, unknown_style, bad_param, good)}

    assert results[good]["status"] == "done"
    assert "unknown backend 'no-such-backend'" in results[unknown_backend]["error"]
    assert "unknown style 'baroque-vaporwave'" in results[unknown_style]["error"]
    assert "cfg_scale" in results[bad_param]["error"]
    for job_id in (unknown_backend, unknown_style, bad_param):
        assert results[job_id]["status"] == "failed"
        assert results[job_id]["attempts"] == 1, "terminal errors are not retried"


async def test_retryable_errors_back_off_and_give_up_after_max_attempts(
    db: asyncpg.Pool, database_url: str, tmp_path: Path
) -> None:
    config = make_config(tmp_path, worker={"retry_base_seconds": 0.1})
    async with running_worker(config, database_url):
        job_id = await insert(db, params={"mock_fail": "retryable"}, max_attempts=3)
        job = await terminal(db, job_id, within=10)
    assert job["status"] == "failed"
    assert job["attempts"] == 3
    assert "simulated outage" in job["error"] and "gave up after 3 attempts" in job["error"]
    assert job["error_detail"]["type"] == "RetryableError"
    # backoff: attempts 1 and 2 waited about 0.05-0.1 s and 0.1-0.2 s before the next run
    assert (job["finished_at"] - job["created_at"]).total_seconds() >= 0.15


async def test_a_retryable_error_then_success_ends_done_with_one_image(
    db: asyncpg.Pool, database_url: str, tmp_path: Path
) -> None:
    # Backoff capped short: one job in 256 fails eight times running, and uncapped its ninth
    # attempt would come after about 13 s of backoff (seen once past the 10 s wait).
    config = make_config(
        tmp_path, backends={"mock": {"type": "mock", "fail_rate": 0.5}}, worker={"retry_max_seconds": 0.2}
    )
    async with running_worker(config, database_url):
        jobs = [await insert(db, f"flaky {i}", max_attempts=20) for i in range(10)]
        rows = [await terminal(db, job_id) for job_id in jobs]
    assert all(row["status"] == "done" for row in rows)
    assert any(row["attempts"] > 1 for row in rows), "with fail_rate 0.5 some job must have retried"
    images = await db.fetchval("SELECT count(*) FROM imagen.images WHERE job_id = ANY($1)", jobs)
    assert images == len(jobs)


async def test_cancelling_a_pending_job_ends_it_at_once(
    db: asyncpg.Pool, database_url: str, tmp_path: Path
) -> None:
    job_id = await insert(db, run_at=_in(3600))
    assert await Queue(db).request_cancel(job_id) == "cancelled"
    job = await job_row(db, job_id)
    assert job["status"] == "cancelled" and job["attempts"] == 0


async def test_cancelling_a_running_job_stops_it_and_ends_it_cancelled_not_failed(
    db: asyncpg.Pool, database_url: str, tmp_path: Path
) -> None:
    config = make_config(tmp_path, backends={"mock": {"type": "mock", "latency_ms": 20000, "max_steps": 200}})
    async with running_worker(config, database_url):
        job_id = await insert(db, steps=200)
        await eventually(lambda: _status_is(db, job_id, "running"))
        asked = time.monotonic()
        assert await Queue(db).request_cancel(job_id) == "running"
        job = await terminal(db, job_id, within=5)
        took = time.monotonic() - asked
    assert job["status"] == "cancelled"
    assert job["attempts"] == 1
    assert took < 2, "the control NOTIFY reaches the worker well before the heartbeat poll"
    assert await db.fetchval("SELECT count(*) FROM imagen.images WHERE job_id = $1", job_id) == 0


async def test_priority_orders_claims_and_run_at_delays_them(
    db: asyncpg.Pool, database_url: str, tmp_path: Path
) -> None:
    low = await insert(db, "low", priority=-5)
    high = await insert(db, "high", priority=50)
    normal = await insert(db, "normal")
    later = await insert(db, "later", run_at=_in(1.0))
    config = make_config(tmp_path, worker={"concurrency": 1, "poll_interval": 5})
    async with running_worker(config, database_url):
        rows = {job: await terminal(db, job, within=10) for job in (low, high, normal, later)}
    order = sorted((low, high, normal), key=lambda job: rows[job]["started_at"])
    assert order == [high, normal, low]
    assert rows[later]["started_at"] >= rows[later]["run_at"]
    assert (rows[later]["started_at"] - rows[later]["run_at"]).total_seconds() < 1.0, (
        "the safety poll is shortened to the next run_at"
    )


async def test_enqueue_with_a_live_dedupe_key_returns_the_existing_job(db: asyncpg.Pool) -> None:
    queue = Queue(db)
    spec = JobSpec(owner_user_id=OWNER, prompt="once", dedupe_key="order-42", run_at=_in(3600))
    first, created = await queue.enqueue(spec)
    second, created_again = await queue.enqueue(spec)
    assert created and not created_again and first == second
    await queue.request_cancel(first)
    third, created_after_cancel = await queue.enqueue(spec)
    assert created_after_cancel and third != first


async def _status_is(db: asyncpg.Pool, job_id: uuid.UUID, status: str) -> bool:
    return bool((await job_row(db, job_id))["status"] == status)


def _in(seconds: float) -> datetime:
    return datetime.now(UTC) + timedelta(seconds=seconds)


async def test_a_job_whose_workers_keep_dying_fails_after_max_attempts(
    db: asyncpg.Pool, database_url: str, tmp_path: Path
) -> None:
    job_id = await db.fetchval(
        "INSERT INTO imagen.jobs (owner_user_id, prompt, status, attempts, max_attempts, "
        "lease_expires_at) VALUES ($1, 'poison', 'running', 3, 3, now() - interval '1 s') "
        "RETURNING id",
        OWNER,
    )
    await db.execute(
        "INSERT INTO imagen.job_runs (job_id, worker_id, attempt) VALUES ($1, gen_random_uuid(), 3)", job_id
    )
    config = make_config(tmp_path)
    async with running_worker(config, database_url):
        job = await terminal(db, job_id)
    assert job["status"] == "failed"
    assert "stopped responding" in job["error"] and "3 attempts" in job["error"]


class RecordsWhyItWasStopped(MockBackend):
    """Blocks until cancelled and remembers whether remote work was to be stopped."""

    seen: list[bool]

    async def generate(self, request: GenerateRequest, ctx: JobContext) -> GenerateResult:
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            self.seen.append(ctx.cancel_requested)
            raise
        raise AssertionError("unreachable")


async def test_the_backend_is_told_to_stop_remote_work_only_when_the_owner_cancels(
    db: asyncpg.Pool, database_url: str, tmp_path: Path
) -> None:
    backend = RecordsWhyItWasStopped.from_config("mock", {"type": "mock"})
    backend.seen = []
    config = make_config(tmp_path, worker={"shutdown_grace": 0.2})
    async with running_worker(config, database_url) as worker:
        worker.backends["mock"] = backend
        cancelled = await insert(db, "cancel me")
        await eventually(lambda: _status_is(db, cancelled, "running"))
        await Queue(db).request_cancel(cancelled)
        await terminal(db, cancelled)
        released = await insert(db, "let go of me")
        await eventually(lambda: _status_is(db, released, "running"))
    assert backend.seen == [True, False], "owner cancel stops remote work; shutdown lets it run on"
    assert (await job_row(db, released))["status"] == "pending"


async def test_a_shutdown_finishes_the_upload_of_a_rendered_image_instead_of_throwing_it_away(
    db: asyncpg.Pool, database_url: str, tmp_path: Path, storage: FakeStorage
) -> None:
    storage.upload_latency = 1.5  # the grace runs out while the rendered image is uploading
    config = make_config(tmp_path, worker={"shutdown_grace": 0.2}, storage={"type": "supabase"})
    async with running_worker(config, database_url) as worker:
        job_id = await insert(db, "rendered before the deploy")
        await eventually(lambda: _uploading(storage))
        worker.request_stop()

    job = await job_row(db, job_id)
    assert job["status"] == "done", job["error"]
    assert job["attempts"] == 1
    assert storage.object_count() == 2  # the image and its thumbnail


async def test_a_shutdown_that_let_an_upload_finish_hands_the_job_back_once_storage_stops_answering(
    db: asyncpg.Pool, database_url: str, tmp_path: Path, storage: FakeStorage
) -> None:
    storage.upload_latency = 1.5  # the grace runs out while the rendered image is uploading,
    storage.fail_next(1, status="drop_after", methods=["PUT"])  # whose answer is then lost,
    storage.fail_next(100_000, status=503)  # and Storage stops answering
    config = make_config(
        tmp_path, worker={"shutdown_grace": 0.2}, storage={"type": "supabase", "max_retries": 0}
    )
    async with running_worker(config, database_url) as worker:
        job_id = await insert(db, "rendered before an outage and a deploy")
        await eventually(lambda: _uploading(storage))
        worker.request_stop()
        stopping = asyncio.get_running_loop().time()
    assert asyncio.get_running_loop().time() - stopping < 10, "the stop did not wait for Storage"

    job = await job_row(db, job_id)
    assert job["status"] == "pending" and job["error"] is None, "handed back, not failed"
    assert len(list((tmp_path / "images").glob("*.png"))) == 1, "the image stays for the next attempt here"


async def _uploading(storage: FakeStorage) -> bool:
    return any(r.method == "PUT" for r in storage.requests)
