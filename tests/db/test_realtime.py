"""Migration 0007: the job and image tables join Supabase Realtime's publication when it exists."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import asyncpg
import pytest

from imagen_worker.db.connect import connect
from imagen_worker.db.migrate import migrate
from tests.storage.test_supabase_migration import migrated_with_storage, objects_visible_to


@pytest.fixture
async def scratch(scratch_dsn: str) -> AsyncIterator[asyncpg.Connection]:
    conn = await connect(scratch_dsn)
    yield conn
    await conn.close()


async def _published(conn: asyncpg.Connection) -> set[str]:
    rows = await conn.fetch(
        "SELECT schemaname || '.' || tablename AS name FROM pg_publication_tables "
        "WHERE pubname = 'supabase_realtime'"
    )
    return {row["name"] for row in rows}


async def test_plain_postgresql_gets_no_publication(scratch: asyncpg.Connection) -> None:
    await migrate(scratch)
    assert await scratch.fetchval("SELECT count(*) FROM pg_publication") == 0
    assert await scratch.fetchval("SELECT imagen.publish_realtime()") == []


async def test_supabase_realtime_publishes_jobs_and_images_once(scratch: asyncpg.Connection) -> None:
    await scratch.execute("CREATE TABLE public.messages (id int PRIMARY KEY)")
    await scratch.execute("CREATE PUBLICATION supabase_realtime FOR TABLE public.messages")
    await migrate(scratch)
    assert await _published(scratch) == {"public.messages", "imagen.jobs", "imagen.images"}
    # Idempotent: a second run adds nothing and does not fail on tables already there.
    assert await scratch.fetchval("SELECT imagen.publish_realtime()") == []
    assert await _published(scratch) == {"public.messages", "imagen.jobs", "imagen.images"}


async def test_a_publication_created_later_is_filled_by_running_the_function_again(
    scratch: asyncpg.Connection,
) -> None:
    await migrate(scratch)
    await scratch.execute("CREATE PUBLICATION supabase_realtime")
    assert await scratch.fetchval("SELECT imagen.publish_realtime()") == ["jobs", "images"]
    assert await _published(scratch) == {"imagen.jobs", "imagen.images"}


async def test_a_publication_for_all_tables_is_left_alone(scratch: asyncpg.Connection) -> None:
    await scratch.execute("CREATE PUBLICATION supabase_realtime FOR ALL TABLES")
    await migrate(scratch)
    assert await scratch.fetchval("SELECT imagen.publish_realtime()") == []
    assert {"imagen.jobs", "imagen.images"} <= await _published(scratch)


async def test_a_signed_in_user_reads_the_previews_in_their_own_folder_and_no_one_elses(
    scratch: asyncpg.Connection,
) -> None:
    await migrated_with_storage(scratch)
    alice, bob = uuid.uuid4(), uuid.uuid4()
    jobs = {}
    for owner in (alice, bob):
        jobs[owner] = await scratch.fetchval(
            "INSERT INTO imagen.jobs (owner_user_id, prompt) VALUES ($1, 'p') RETURNING id", owner
        )
    keys = [
        f"{alice}/{jobs[alice]}/preview.jpg",
        f"{alice}/{jobs[alice]}/preview.png",
        f"{alice}/{jobs[alice]}/other.png",
        f"{alice}/{jobs[bob]}/preview.jpg",  # Alice's folder decides, not the job id
        f"{bob}/{jobs[bob]}/preview.jpg",
        f"{alice}/{jobs[alice]}/preview.jpg/x",
    ]
    for key in keys:
        await scratch.execute(
            "INSERT INTO storage.objects (bucket_id, name) VALUES ('imagen-generated', $1)", key
        )

    async def visible_to(user: uuid.UUID) -> set[str]:
        return {name for _, name in await objects_visible_to(scratch, user)}

    # 0005's owner-folder policy: the first folder is the reader's own user id.
    assert await visible_to(alice) == {k for k in keys if k.startswith(f"{alice}/")}
    assert await visible_to(bob) == {keys[4]}
