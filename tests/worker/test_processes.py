"""Real ``imagen-worker run`` processes: several at once, killed, and stopped by signals."""

from __future__ import annotations

import asyncio
import signal
import uuid
from pathlib import Path

import asyncpg

from imagen_worker.backends.comfyui.pool import first_prompt_id
from tests.fakes.comfyui import FakeComfyUI
from tests.faults.gpu import comfyui_block
from tests.workers import eventually, wait_registered, worker_processes, write_config

OWNER = uuid.UUID("00000000-0000-4000-8000-000000000002")


async def insert_many(db: asyncpg.Pool, count: int, **columns: object) -> list[uuid.UUID]:
    rows = await db.fetch(
        "INSERT INTO imagen.jobs (owner_user_id, prompt, steps) "
        "SELECT $1, 'job ' || n, $2 FROM generate_series(1, $3) AS n RETURNING id",
        OWNER,
        columns.get("steps", 1),
        count,
    )
    return [row["id"] for row in rows]


async def counts(db: asyncpg.Pool) -> dict[str, int]:
    rows = await db.fetch("SELECT status, count(*)::int AS n FROM imagen.jobs GROUP BY status")
    return {row["status"]: row["n"] for row in rows}


async def test_three_workers_do_300_jobs_each_exactly_once(
    db: asyncpg.Pool, database_url: str, tmp_path: Path
) -> None:
    config = write_config(tmp_path, worker={"concurrency": 4})
    with worker_processes(database_url, config, 3, tmp_path) as procs:
        await wait_registered(db, *procs)
        jobs = await insert_many(db, 300)
        await eventually(lambda: _all_done(db, 300), within=90, every=0.25)

    images_per_job = await db.fetch(
        "SELECT j.id, count(i.id) AS images FROM imagen.jobs j LEFT JOIN imagen.images i ON i.job_id = j.id "
        "GROUP BY j.id"
    )
    assert len(images_per_job) == len(jobs)
    assert all(row["images"] == 1 for row in images_per_job)
    workers_used = await db.fetchval("SELECT count(DISTINCT worker_id) FROM imagen.job_runs")
    assert workers_used == 3, "the load spreads over every worker"
    assert await db.fetchval("SELECT max(attempts) FROM imagen.jobs") == 1


async def _all_done(db: asyncpg.Pool, expected: int) -> bool:
    return (await counts(db)).get("done", 0) == expected


async def test_a_job_of_a_kill_9_worker_is_finished_by_another_after_its_lease_expires(
    db: asyncpg.Pool, database_url: str, tmp_path: Path
) -> None:
    config = write_config(
        tmp_path,
        backends={"mock": {"type": "mock", "latency_ms": 1500}},
        worker={"lease_seconds": 3, "concurrency": 1},
    )
    with worker_processes(database_url, config, 1, tmp_path) as (victim,):
        await wait_registered(db, victim)
        (job_id,) = await insert_many(db, 1, steps=10)
        await eventually(lambda: _running_on(db, job_id), within=10)
        victim.kill()
    with worker_processes(database_url, config, 1, tmp_path) as (rescuer,):
        await wait_registered(db, rescuer)
        await eventually(lambda: _all_done(db, 1), within=20, every=0.2)

    job = await db.fetchrow("SELECT * FROM imagen.jobs WHERE id = $1", job_id)
    assert job["attempts"] == 2
    assert await db.fetchval("SELECT count(*) FROM imagen.images WHERE job_id = $1", job_id) == 1


async def test_a_kill_9_after_the_post_leaves_a_prompt_the_next_worker_adopts_not_renders_again(
    db: asyncpg.Pool, database_url: str, tmp_path: Path, fake_comfyui: FakeComfyUI
) -> None:
    # The first claim writes nothing between the claim and the POST: the rescuer finds the
    # prompt by the id derived from the job id.
    fake_comfyui.default_duration = 4.0
    backends = {"gpu": comfyui_block(fake_comfyui)}
    config = write_config(tmp_path, backends=backends, worker={"lease_seconds": 3, "concurrency": 1})
    with worker_processes(database_url, config, 1, tmp_path) as (victim,):
        await wait_registered(db, victim)
        (job_id,) = await insert_many(db, 1, steps=10)
        running = await fake_comfyui.wait_running(within=10)
        victim.kill()
    assert await db.fetchval("SELECT backend_ref FROM imagen.job_runs WHERE job_id = $1", job_id) is None
    with worker_processes(database_url, config, 1, tmp_path) as (rescuer,):
        await wait_registered(db, rescuer)
        await eventually(lambda: _all_done(db, 1), within=30, every=0.2)

    assert running == first_prompt_id(job_id)
    assert [r.body["prompt_id"] for r in fake_comfyui.calls("POST", "/prompt")] == [running], "rendered once"
    job = await db.fetchrow("SELECT * FROM imagen.jobs WHERE id = $1", job_id)
    assert job["attempts"] == 2
    image = await db.fetchrow(
        "SELECT i.id, n.backend_metadata FROM imagen.images i "
        "JOIN imagen.image_internals n ON n.image_id = i.id WHERE i.job_id = $1",
        job_id,
    )
    assert image["id"] == job["image_id"] and image["backend_metadata"]["prompt_id"] == running


async def _running_on(db: asyncpg.Pool, job_id: uuid.UUID) -> bool:
    status = await db.fetchval("SELECT status FROM imagen.jobs WHERE id = $1", job_id)
    return bool(status == "running")


async def sigterm_with_two_jobs_running(
    db: asyncpg.Pool, database_url: str, tmp_path: Path, *, job_seconds: float, grace: float
) -> int:
    """Start a worker, let it pick up two jobs, send SIGTERM; returns the exit code."""
    config = write_config(
        tmp_path,
        backends={"mock": {"type": "mock", "latency_ms": job_seconds * 1000}},
        worker={"shutdown_grace": grace, "concurrency": 2},
    )
    with worker_processes(database_url, config, 1, tmp_path) as (proc,):
        await wait_registered(db, proc)
        await insert_many(db, 2, steps=10)
        await eventually(lambda: _running_count(db, 2), within=10)
        proc.signal(signal.SIGTERM)
        return await asyncio.to_thread(proc.wait, 30)


async def test_sigterm_lets_running_jobs_finish_within_the_grace(
    db: asyncpg.Pool, database_url: str, tmp_path: Path
) -> None:
    code = await sigterm_with_two_jobs_running(db, database_url, tmp_path, job_seconds=1, grace=20)
    assert code == 0
    assert await counts(db) == {"done": 2}


async def test_sigterm_past_the_grace_releases_unfinished_jobs_to_pending(
    db: asyncpg.Pool, database_url: str, tmp_path: Path
) -> None:
    code = await sigterm_with_two_jobs_running(db, database_url, tmp_path, job_seconds=60, grace=0.5)
    assert code == 0
    rows = await db.fetch("SELECT status, attempts, lease_expires_at FROM imagen.jobs")
    assert [row["status"] for row in rows] == ["pending", "pending"]
    assert all(row["attempts"] == 0 for row in rows), "a released job does not lose an attempt"
    assert all(row["lease_expires_at"] is None for row in rows)


async def _running_count(db: asyncpg.Pool, expected: int) -> bool:
    return (await counts(db)).get("running", 0) == expected
