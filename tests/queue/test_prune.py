"""Housekeeping: jobs that ended before the cutoff go, with their run records; nothing live
goes, images stay for their owners, and pending webhook deliveries are still sent."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg

from imagen_worker.queue.prune import Pruned, prunable, prune
from tests.workers import insert_job, make_config, running_worker, terminal

OLD = timedelta(days=40)
CUTOFF = timedelta(days=30)


async def _history(db: asyncpg.Pool, database_url: str, tmp_path: Path) -> dict[str, uuid.UUID]:
    """One job of each kind, the ended ones but ``recent`` backdated 40 days, and webhook
    deliveries of each status, 40 days old but one."""
    async with running_worker(make_config(tmp_path), database_url):
        jobs = {
            "done": await insert_job(db, "an old fox"),
            "recent": await insert_job(db, "a new fox"),
            "failed": await insert_job(db, "an old failure", params={"mock_fail": "terminal"}),
        }
        for job in jobs.values():
            await terminal(db, job)
    jobs["cancelled"] = await insert_job(db, "cancelled before it started", run_at=datetime.now(UTC) + OLD)
    await db.execute("UPDATE imagen.jobs SET cancel_requested = true WHERE id = $1", jobs["cancelled"])
    jobs["pending"] = await insert_job(db, "scheduled long ago, still to run", run_at=datetime.now(UTC) + OLD)
    ended = [jobs[kind] for kind in ("done", "failed", "cancelled")]
    await db.execute(
        "UPDATE imagen.jobs SET finished_at = now() - $2::interval WHERE id = ANY($1)", ended, OLD
    )
    await db.execute(
        "UPDATE imagen.jobs SET created_at = now() - $2::interval WHERE id = $1", jobs["pending"], OLD
    )
    for status, age in (("delivered", OLD), ("failed", OLD), ("pending", OLD), ("delivered", timedelta(0))):
        await db.execute(
            "INSERT INTO imagen.webhook_deliveries (job_id, event, status, delivered_at, created_at)"
            " VALUES ($1, 'done', $2, CASE WHEN $2 = 'delivered' THEN now() END, now() - $3::interval)",
            jobs["done"], status, age,
        )  # fmt: skip
    return jobs


async def test_prune_removes_what_ended_before_the_cutoff_in_batches_and_keeps_images_and_live_jobs(
    db: asyncpg.Pool, database_url: str, tmp_path: Path
) -> None:
    jobs = await _history(db, database_url, tmp_path)
    image = await db.fetchval("SELECT image_id FROM imagen.jobs WHERE id = $1", jobs["done"])

    async with db.acquire() as conn:
        pruned = await prune(conn, datetime.now(UTC) - CUTOFF, batch=1)  # several batches each
        again = await prune(conn, datetime.now(UTC) - CUTOFF)

    assert pruned.jobs == {"done": 1, "failed": 1, "cancelled": 1} and pruned.deliveries == 2
    assert pruned.describe() == "3 jobs (cancelled 1, done 1, failed 1) and 2 webhook deliveries"
    assert again == Pruned(), "nothing is left to remove"
    left = {row["id"] for row in await db.fetch("SELECT id FROM imagen.jobs")}
    assert left == {jobs["recent"], jobs["pending"]}, "the recent job and the pending one stay"
    assert await db.fetchval("SELECT count(*) FROM imagen.job_runs WHERE job_id <> ALL($1)", list(left)) == 0
    kept = await db.fetchrow("SELECT job_id, storage_path FROM imagen.images WHERE id = $1", image)
    assert kept is not None and kept["job_id"] is None, "the image stays in its owner's gallery"
    deliveries = await db.fetch("SELECT status FROM imagen.webhook_deliveries ORDER BY status")
    assert [row["status"] for row in deliveries] == ["delivered", "pending"], "the new one and the unsent one"


async def test_a_dry_run_counts_exactly_what_prune_then_removes(
    db: asyncpg.Pool, database_url: str, tmp_path: Path
) -> None:
    await _history(db, database_url, tmp_path)
    before = datetime.now(UTC) - CUTOFF
    async with db.acquire() as conn:
        counted = await prunable(conn, before)
        counted_again = await prunable(conn, before)
        removed = await prune(conn, before)

    assert counted == counted_again == removed, "a dry run removes nothing"
    assert counted.describe() == "3 jobs (cancelled 1, done 1, failed 1) and 2 webhook deliveries"
