"""No second generation across hosts: the upload is recorded in the database as it lands.

Two real ``imagen-worker run`` processes with separate output directories stand for two
hosts. The first is killed with SIGKILL right after its upload is recorded, while it waits
to write the images row; the second takes the job once the lease expires and links the
stored object: one object, one images row, one render.
"""

from __future__ import annotations

import uuid
from pathlib import Path

import asyncpg

from tests.fakes.storage import FakeStorage
from tests.workers import eventually, insert_job, job_row, wait_registered, worker_processes, write_config

OWNER = uuid.UUID("00000000-0000-4000-8000-0000000000c5")


def host(tmp_path: Path, name: str) -> Path:
    directory = tmp_path / name
    directory.mkdir()
    return write_config(
        directory,
        backends={"mock": {"type": "mock", "latency_ms": 100}},
        worker={"lease_seconds": 3, "concurrency": 1},
        storage={"type": "supabase", "max_retries": 0},
    )


async def test_a_retry_on_another_host_links_the_upload_instead_of_rendering_again(
    db: asyncpg.Pool, database_url: str, tmp_path: Path, storage: FakeStorage
) -> None:
    first_host, second_host = host(tmp_path, "a"), host(tmp_path, "b")
    job_id = await insert_job(db, "a lantern in fog", owner_user_id=OWNER, width=128, height=128)
    key = f"{OWNER}/{job_id}.png"

    async with db.acquire() as blocker:
        blocker_tx = blocker.transaction()
        await blocker_tx.start()
        # The images row cannot be written while this lock is held: the first worker stops
        # between its recorded upload and the job's completion.
        await blocker.execute("LOCK TABLE imagen.images IN SHARE MODE")
        with worker_processes(database_url, first_host, 1, tmp_path / "a") as (first,):
            await wait_registered(db, first)

            async def upload_recorded_and_completion_waiting() -> bool:
                recorded = await db.fetchval(
                    "SELECT result IS NOT NULL FROM imagen.job_runs WHERE job_id = $1", job_id
                )
                waiting = await db.fetchval(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                    " AND wait_event_type = 'Lock' AND query LIKE '%INSERT INTO imagen.images%'"
                )
                return bool(recorded and waiting)

            await eventually(upload_recorded_and_completion_waiting, within=20, every=0.05)
            first.kill()
        await db.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = current_database()"
            " AND wait_event_type = 'Lock' AND query LIKE '%INSERT INTO imagen.images%'"
        )
        await blocker_tx.rollback()
    assert storage.put_count(key) == 1 and await db.fetchval("SELECT count(*) FROM imagen.images") == 0

    with worker_processes(database_url, second_host, 1, tmp_path / "b") as (second,):
        await wait_registered(db, second)

        async def done() -> bool:
            return bool((await job_row(db, job_id))["status"] == "done")

        await eventually(done, within=30, every=0.1)

    job = await job_row(db, job_id)
    assert job["attempts"] == 2 and job["result"] is None, "the upload record became the images row"
    images = await db.fetch("SELECT storage_path, sha256 FROM imagen.images WHERE job_id = $1", job_id)
    assert [row["storage_path"] for row in images] == [key]
    assert storage.object_count() == 2 and storage.put_count(key) == 1, (
        "one image (and its thumbnail), uploaded once"
    )
    stored = storage.get(key)
    assert stored is not None
    rendered_on_first = list((tmp_path / "a" / "images").glob("*.png"))
    assert len(rendered_on_first) == 1 and rendered_on_first[0].read_bytes() == stored.data
    assert list((tmp_path / "b" / "images").glob("*.png")) == [], "the second host rendered nothing"
    assert '"linked_earlier_upload": true' in (tmp_path / "b" / "worker-0.log").read_text()
