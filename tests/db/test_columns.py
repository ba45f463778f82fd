"""What a web user can read: whole rows of their own jobs and images, and nothing internal.

supabase-js reads with ``select=*`` and ``insert(...).select()`` returns ``*``; PostgreSQL
refuses a ``SELECT *`` when any column is not granted, so internals are not hidden by column
grants but live in worker-only tables (imagen.job_runs, imagen.image_internals,
imagen.settings) that anon and authenticated cannot touch at all.
"""

from __future__ import annotations

import json
import shutil
import uuid
from pathlib import Path

import asyncpg
import pytest

from imagen_worker.db.connect import connect
from imagen_worker.db.migrate import migrate, migrations_dir
from imagen_worker.queue.jobs import ImageRecord, Queue
from tests.db.test_rls import ALICE, add_image, add_job, request_as

INTERNAL_COLUMNS = {"worker_id", "backend_ref", "error_detail", "result", "local_path", "backend_metadata"}
WORKER_ONLY_TABLES = ["imagen.job_runs", "imagen.image_internals", "imagen.settings"]
USER_TABLES = ["imagen.jobs", "imagen.images"]


async def columns(db: asyncpg.Pool, table: str) -> list[str]:
    schema, name = table.split(".")
    return [
        row["column_name"]
        for row in await db.fetch(
            "SELECT column_name FROM information_schema.columns WHERE table_schema = $1 AND table_name = $2",
            schema,
            name,
        )
    ]


async def a_finished_job(db: asyncpg.Pool) -> uuid.UUID:
    """A job run the way the worker runs it, so every worker-only record is filled in."""
    job_id = await add_job(db, ALICE)
    queue = Queue(db, uuid.uuid4())
    (job,) = await queue.claim("mock", is_default=True, limit=1, lease_seconds=30)
    await queue.set_backend_ref(job, "prompt-9d2a@http://10.0.0.5:8188")
    record = ImageRecord(
        storage_path=f"{ALICE}/{job_id}.png", mime_type="image/png", bytes=3, sha256="a" * 64,
        backend="mock", seed=1, latency_ms=5, sidecar={"prompt": "p"},
        internals={"local_path": "/srv/imagen/out.png", "backend_metadata": {"client_id": "client-7f3e"}},
    )  # fmt: skip
    await queue.record_upload(job, record)
    await queue.complete(job, record)
    return job_id


@pytest.mark.parametrize("table", USER_TABLES)
async def test_every_column_of_the_user_tables_is_readable_so_select_star_works(
    db: asyncpg.Pool, table: str
) -> None:
    names = await columns(db, table)
    readable = {
        name
        for name in names
        if await db.fetchval("SELECT has_column_privilege('authenticated', $1, $2, 'SELECT')", table, name)
    }
    assert readable == set(names)
    assert not INTERNAL_COLUMNS & set(names), "internals are not columns of what users read"


@pytest.mark.parametrize("table", WORKER_ONLY_TABLES)
@pytest.mark.parametrize("role", ["anon", "authenticated"])
async def test_worker_only_tables_grant_nothing_to_web_roles(db: asyncpg.Pool, table: str, role: str) -> None:
    for privilege in ("SELECT", "INSERT", "UPDATE", "DELETE", "TRUNCATE", "REFERENCES"):
        assert not await db.fetchval("SELECT has_table_privilege($1, $2, $3)", role, table, privilege)
    for name in await columns(db, table):
        assert not await db.fetchval("SELECT has_column_privilege($1, $2, $3, 'SELECT')", role, table, name)


async def test_select_star_as_the_owner_returns_the_whole_job_and_image_without_internals(
    db: asyncpg.Pool,
) -> None:
    job_id = await a_finished_job(db)

    async with request_as(db, "authenticated", ALICE) as conn:
        job = await conn.fetchrow("SELECT * FROM imagen.jobs WHERE id = $1", job_id)
        image = await conn.fetchrow("SELECT * FROM imagen.images WHERE job_id = $1", job_id)

    assert job is not None and job["status"] == "done"
    assert image is not None and image["storage_path"] == f"{ALICE}/{job_id}.png"
    assert not INTERNAL_COLUMNS & set(job.keys()) and not INTERNAL_COLUMNS & set(image.keys())
    readable = json.dumps({**dict(job), **dict(image)}, default=str)
    for secret in ("10.0.0.5", "/srv/imagen", "client-7f3e", "prompt-9d2a"):
        assert secret not in readable
    internals = await db.fetchrow("SELECT local_path, backend_metadata FROM imagen.image_internals")
    assert tuple(internals) == ("/srv/imagen/out.png", {"client_id": "client-7f3e"}), "the operator has them"


async def test_insert_returning_star_works_as_authenticated(db: asyncpg.Pool) -> None:
    async with request_as(db, "authenticated", ALICE) as conn:
        row = await conn.fetchrow(
            "INSERT INTO imagen.jobs (owner_user_id, prompt) VALUES ($1, 'a red fox') RETURNING *", ALICE
        )

    assert row is not None and row["status"] == "pending" and row["owner_user_id"] == ALICE
    assert set(row.keys()) == set(await columns(db, "imagen.jobs"))


@pytest.mark.parametrize("table", WORKER_ONLY_TABLES)
async def test_the_owner_cannot_read_worker_only_tables_even_for_their_own_job(
    db: asyncpg.Pool, table: str
) -> None:
    await a_finished_job(db)
    with pytest.raises(asyncpg.InsufficientPrivilegeError, match="permission denied"):
        async with request_as(db, "authenticated", ALICE) as conn:
            await conn.fetch(f"SELECT * FROM {table}")


@pytest.mark.parametrize("table", USER_TABLES + WORKER_ONLY_TABLES)
async def test_anon_reads_nothing(db: asyncpg.Pool, table: str) -> None:
    await a_finished_job(db)
    with pytest.raises(asyncpg.InsufficientPrivilegeError, match="permission denied"):
        async with request_as(db, "anon") as conn:
            await conn.fetch(f"SELECT * FROM {table}")


async def test_anon_cannot_insert_a_job(db: asyncpg.Pool) -> None:
    with pytest.raises(asyncpg.InsufficientPrivilegeError, match="permission denied"):
        async with request_as(db, "anon", ALICE) as conn:
            await conn.fetch(
                "INSERT INTO imagen.jobs (owner_user_id, prompt) VALUES ($1, 'p') RETURNING *", ALICE
            )


async def test_another_user_sees_neither_the_job_nor_its_image(db: asyncpg.Pool) -> None:
    await a_finished_job(db)
    await add_image(db, ALICE)
    async with request_as(db, "authenticated", uuid.uuid4()) as conn:
        assert await conn.fetch("SELECT * FROM imagen.jobs") == []
        assert await conn.fetch("SELECT * FROM imagen.images") == []


async def test_migration_0005_moves_existing_internals_out_of_the_readable_rows(
    scratch_dsn: str, tmp_path: Path
) -> None:
    before = tmp_path / "migrations"
    before.mkdir()
    for path in migrations_dir().glob("000[1-4]_*.sql"):
        shutil.copy(path, before / path.name)
    conn = await connect(scratch_dsn)
    try:
        await migrate(conn, before)
        worker = uuid.uuid4()
        job_id = await conn.fetchval(
            """INSERT INTO imagen.jobs (owner_user_id, prompt, status, worker_id, lease_expires_at,
                                        backend_ref, error_detail, attempts)
               VALUES ($1, 'old', 'running', $2, now() + interval '1 minute', 'p@http://gpu:8188',
                       '{"body": "<html>"}', 2) RETURNING id""",
            ALICE,
            worker,
        )
        image_id = await conn.fetchval(
            """INSERT INTO imagen.images (owner_user_id, prompt, prompt_hash, backend, storage_path,
                                          mime_type, bytes, sha256, sidecar)
               VALUES ($1, 'p', 'h', 'mock', '2026-01-01/old.png', 'image/png', 1, $2,
                       '{"seed": 1, "local_path": "/srv/x.png", "backend_metadata": {"client_id": "c"}}')
               RETURNING id""",
            ALICE,
            "0" * 64,
        )

        await migrate(conn)

        run = await conn.fetchrow("SELECT worker_id, attempt, backend_ref, error_detail FROM imagen.job_runs")
        assert tuple(run) == (worker, 2, "p@http://gpu:8188", {"body": "<html>"})
        assert await conn.fetchval("SELECT sidecar FROM imagen.images WHERE id = $1", image_id) == {"seed": 1}
        internals = await conn.fetchrow("SELECT * FROM imagen.image_internals")
        assert tuple(internals) == (image_id, "/srv/x.png", {"client_id": "c"})
        assert await conn.fetchval("SELECT status FROM imagen.jobs WHERE id = $1", job_id) == "running"
    finally:
        await conn.close()
