"""0003_supabase_storage: a no-op on plain PostgreSQL; on Supabase, the bucket and owner-only reads.

"Supabase" here is a scratch database with a minimal ``storage`` schema shaped like the one
Supabase's storage migrations create (RLS enabled on ``storage.objects``, no policies).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator

import asyncpg
import pytest

from imagen_worker.db.connect import connect
from imagen_worker.db.migrate import migrate

FAKE_STORAGE_SCHEMA = """
-- Supabase has its roles before any project schema: create them where this cluster has none yet.
DO $$ BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'authenticated') THEN
        CREATE ROLE authenticated NOLOGIN;
    END IF;
END $$;
CREATE SCHEMA storage;
CREATE TABLE storage.buckets (
    id text PRIMARY KEY,
    name text NOT NULL,
    owner uuid,
    public boolean DEFAULT false,
    created_at timestamptz DEFAULT now()
);
CREATE TABLE storage.objects (
    id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    bucket_id text REFERENCES storage.buckets (id),
    name text,
    owner uuid,
    created_at timestamptz DEFAULT now(),
    UNIQUE (bucket_id, name)
);
ALTER TABLE storage.objects ENABLE ROW LEVEL SECURITY;
"""


async def migrated_with_storage(conn: asyncpg.Connection) -> None:
    """The stand-in storage schema, readable by ``authenticated`` as on Supabase, then our migrations."""
    await conn.execute(FAKE_STORAGE_SCHEMA)
    await conn.execute(
        "GRANT USAGE ON SCHEMA storage TO authenticated; GRANT SELECT ON storage.objects TO authenticated"
    )
    await migrate(conn)


async def objects_visible_to(conn: asyncpg.Connection, user: uuid.UUID | None) -> list[tuple[str, str]]:
    """(bucket, name) of every storage object a signed-in ``user`` may read (None: no claims), sorted."""
    async with conn.transaction():
        await conn.execute("SET LOCAL ROLE authenticated")
        claims = json.dumps({"sub": str(user), "role": "authenticated"}) if user else ""
        await conn.execute("SELECT set_config('request.jwt.claims', $1, true)", claims)
        rows = await conn.fetch("SELECT bucket_id, name FROM storage.objects ORDER BY bucket_id, name")
    return [(r["bucket_id"], r["name"]) for r in rows]


POLICY = "imagen_generated_select_own"


@pytest.fixture
async def scratch(scratch_dsn: str) -> AsyncIterator[asyncpg.Connection]:
    conn = await connect(scratch_dsn)
    try:
        yield conn
    finally:
        await conn.close()


async def _policies(conn: asyncpg.Connection) -> list[asyncpg.Record]:
    rows: list[asyncpg.Record] = await conn.fetch(
        "SELECT policyname, cmd, roles FROM pg_policies"
        " WHERE schemaname = 'storage' AND tablename = 'objects'"
    )
    return rows


async def test_on_plain_postgresql_the_migration_is_a_recorded_no_op(scratch: asyncpg.Connection) -> None:
    applied = await migrate(scratch)

    assert "0003_supabase_storage" in applied
    assert await scratch.fetchval("SELECT to_regnamespace('storage')") is None
    assert await scratch.fetchval("SELECT count(*) FROM pg_policies WHERE policyname = $1", POLICY) == 0


async def test_on_supabase_it_creates_the_private_bucket_and_an_owner_read_policy(
    scratch: asyncpg.Connection,
) -> None:
    await scratch.execute(FAKE_STORAGE_SCHEMA)

    await migrate(scratch)

    bucket = await scratch.fetchrow("SELECT id, name, public FROM storage.buckets")
    assert dict(bucket) == {"id": "imagen-generated", "name": "imagen-generated", "public": False}
    assert sorted((p["policyname"], p["cmd"], p["roles"]) for p in await _policies(scratch)) == [
        (POLICY, "SELECT", ["authenticated"]),
        ("imagen_uploads_delete_own", "DELETE", ["authenticated"]),  # 0009: input images
        ("imagen_uploads_insert_own", "INSERT", ["authenticated"]),
        ("imagen_uploads_update_own", "UPDATE", ["authenticated"]),
    ]


async def test_an_existing_bucket_and_policy_are_left_alone(scratch: asyncpg.Connection) -> None:
    await scratch.execute(FAKE_STORAGE_SCHEMA)
    await scratch.execute(
        "INSERT INTO storage.buckets (id, name, public) VALUES ('imagen-generated', 'mine', false)"
    )

    await migrate(scratch)

    assert await scratch.fetchval("SELECT name FROM storage.buckets WHERE id = 'imagen-generated'") == "mine"
    assert [p["policyname"] for p in await _policies(scratch)].count(POLICY) == 1


async def test_a_signed_in_user_sees_only_objects_recorded_as_their_images(
    scratch: asyncpg.Connection,
) -> None:
    await migrated_with_storage(scratch)
    alice, bob = uuid.uuid4(), uuid.uuid4()
    await scratch.execute("INSERT INTO storage.buckets (id, name) VALUES ('other', 'other')")
    for bucket, key in [
        ("imagen-generated", "2026-05-11/alice-1.png"),
        ("imagen-generated", "2026-05-11/bob-1.png"),
        ("imagen-generated", "2026-05-11/orphan.png"),
        ("other", "2026-05-11/alice-1.png"),
    ]:
        await scratch.execute("INSERT INTO storage.objects (bucket_id, name) VALUES ($1, $2)", bucket, key)
    for owner, key in [(alice, "2026-05-11/alice-1.png"), (bob, "2026-05-11/bob-1.png")]:
        await scratch.execute(
            """INSERT INTO imagen.images (owner_user_id, prompt, prompt_hash, backend, storage_path,
                                          mime_type, bytes, sha256)
               VALUES ($1, 'p', 'h', 'mock', $2, 'image/png', 1, repeat('a', 64))""",
            owner,
            key,
        )

    assert await objects_visible_to(scratch, alice) == [("imagen-generated", "2026-05-11/alice-1.png")]
    assert await objects_visible_to(scratch, bob) == [("imagen-generated", "2026-05-11/bob-1.png")]
    assert await objects_visible_to(scratch, None) == []
