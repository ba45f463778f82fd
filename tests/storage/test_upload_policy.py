"""Migration 0009 on a database with Supabase's storage tables: users write only their uploads.

Plain PostgreSQL has no ``storage`` schema, so the stand-in of the 0003 specs (RLS on, as
Supabase has it) is created first; then every migration runs.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator

import asyncpg
import pytest

from imagen_worker.db.connect import connect
from imagen_worker.db.migrate import migrate
from tests.storage.test_supabase_migration import FAKE_STORAGE_SCHEMA

USER = uuid.UUID("00000000-0000-4000-8000-0000000000d1")
OTHER = uuid.UUID("00000000-0000-4000-8000-0000000000d2")
# A rendered image's name (a job id): fixed, so every xdist worker collects the same test ids.
RENDER = uuid.UUID("6f1c2a9e-3b47-4d2a-9c1e-5a8b7d6e4f30")


@pytest.fixture
async def supabase_like(scratch_dsn: str) -> AsyncIterator[asyncpg.Connection]:
    conn = await connect(scratch_dsn)
    await conn.execute(FAKE_STORAGE_SCHEMA)
    await migrate(conn)
    await conn.execute("GRANT USAGE ON SCHEMA storage TO authenticated")
    await conn.execute("GRANT SELECT, INSERT, UPDATE, DELETE ON storage.objects TO authenticated")
    await conn.execute("INSERT INTO storage.buckets (id, name) VALUES ('other-bucket', 'other-bucket')")
    yield conn
    await conn.close()


async def as_user(conn: asyncpg.Connection, statement: str, *args: object) -> str:
    """Run one statement as the signed-in USER; ``ok`` or the refusal's class name."""
    try:
        async with conn.transaction():
            await conn.execute("SET LOCAL ROLE authenticated")
            claims = json.dumps({"sub": str(USER), "role": "authenticated"})
            await conn.execute("SELECT set_config('request.jwt.claims', $1, true)", claims)
            status = await conn.execute(statement, *args)
    except asyncpg.PostgresError as exc:
        return type(exc).__name__
    return "ok" if not status.endswith(" 0") else "nothing"


@pytest.mark.parametrize(
    ("bucket", "name", "outcome"),
    [
        ("imagen-generated", f"{USER}/uploads/cat.png", "ok"),
        ("imagen-generated", f"{USER}/uploads/sub/cat.png", "ok"),
        ("imagen-generated", f"{USER}/{RENDER}.png", "InsufficientPrivilegeError"),
        ("imagen-generated", f"{USER}/uploads", "InsufficientPrivilegeError"),
        ("imagen-generated", f"{OTHER}/uploads/cat.png", "InsufficientPrivilegeError"),
        ("imagen-generated", f"x{USER}/uploads/cat.png", "InsufficientPrivilegeError"),
        ("other-bucket", f"{USER}/uploads/cat.png", "InsufficientPrivilegeError"),
    ],
)
async def test_a_user_uploads_only_into_their_own_uploads_folder(
    supabase_like: asyncpg.Connection, bucket: str, name: str, outcome: str
) -> None:
    result = await as_user(
        supabase_like, "INSERT INTO storage.objects (bucket_id, name) VALUES ($1, $2)", bucket, name
    )

    assert result == outcome


async def test_a_user_replaces_and_deletes_only_their_own_uploads(supabase_like: asyncpg.Connection) -> None:
    mine, theirs = f"{USER}/uploads/cat.png", f"{OTHER}/uploads/cat.png"
    await supabase_like.execute(
        "INSERT INTO storage.objects (bucket_id, name) "
        "VALUES ('imagen-generated', $1), ('imagen-generated', $2)",
        mine,
        theirs,
    )
    update = "UPDATE storage.objects SET name = $2 WHERE name = $1"
    delete = "DELETE FROM storage.objects WHERE name = $1"

    assert await as_user(supabase_like, update, mine, f"{USER}/uploads/dog.png") == "ok"
    assert await as_user(supabase_like, update, f"{USER}/uploads/dog.png", theirs + ".x") == (
        "InsufficientPrivilegeError"
    )
    assert await as_user(supabase_like, update, theirs, f"{USER}/uploads/stolen.png") == "nothing"
    assert await as_user(supabase_like, delete, theirs) == "nothing"
    assert await as_user(supabase_like, delete, f"{USER}/uploads/dog.png") == "ok"
    assert await supabase_like.fetchval("SELECT count(*) FROM storage.objects") == 1
