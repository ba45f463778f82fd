"""Row-level security as the web UI meets it: PostgREST's role switch and JWT claims.

Every request runs the way PostgREST runs it: one transaction, ``SET LOCAL ROLE`` and the
claims set with ``set_config(..., true)``. Fixture rows are written by the table owner (the
pool's own connection), which bypasses RLS exactly like the worker does.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, Literal

import asyncpg
import pytest

ALICE = uuid.UUID("00000000-0000-4000-8000-00000000a11c")
BOB = uuid.UUID("00000000-0000-4000-8000-000000000b0b")
WORKER = uuid.UUID("00000000-0000-4000-8000-0000000000ff")

ClaimForm = Literal["claims", "legacy"]


@asynccontextmanager
async def request_on(
    conn: asyncpg.Connection, role: str, sub: uuid.UUID | None = None, *, form: ClaimForm = "claims"
) -> AsyncIterator[asyncpg.Connection]:
    """One PostgREST-style request: a transaction running as ``role`` with ``sub`` in the JWT."""
    async with conn.transaction():
        await conn.execute(f"SET LOCAL ROLE {role}")
        if sub is not None and form == "claims":
            claims = json.dumps({"sub": str(sub), "role": role})
            await conn.execute("SELECT set_config('request.jwt.claims', $1, true)", claims)
        elif sub is not None:
            await conn.execute("SELECT set_config('request.jwt.claim.sub', $1, true)", str(sub))
            await conn.execute("SELECT set_config('request.jwt.claim.role', $1, true)", role)
        yield conn


@asynccontextmanager
async def request_as(
    pool: asyncpg.Pool, role: str, sub: uuid.UUID | None = None, *, form: ClaimForm = "claims"
) -> AsyncIterator[asyncpg.Connection]:
    """``request_on`` a connection borrowed from the pool."""
    async with pool.acquire() as conn, request_on(conn, role, sub, form=form) as request:
        yield request


async def add_job(pool: asyncpg.Pool, owner: uuid.UUID, **columns: Any) -> uuid.UUID:
    row = {"owner_user_id": owner, "prompt": f"a job of {owner}", **columns}
    placeholders = ", ".join(f"${i}" for i in range(1, len(row) + 1))
    job_id: uuid.UUID = await pool.fetchval(
        f"INSERT INTO imagen.jobs ({', '.join(row)}) VALUES ({placeholders}) RETURNING id", *row.values()
    )
    return job_id


async def add_image(pool: asyncpg.Pool, owner: uuid.UUID) -> uuid.UUID:
    image_id: uuid.UUID = await pool.fetchval(
        """INSERT INTO imagen.images (owner_user_id, prompt, prompt_hash, backend, storage_path,
                                      mime_type, bytes, sha256)
           VALUES ($1, 'p', 'h', 'mock', $2, 'image/png', 1, $3) RETURNING id""",
        owner,
        f"{uuid.uuid4().hex}.png",
        "0" * 64,
    )
    return image_id


async def status_of(pool: asyncpg.Pool, job_id: uuid.UUID) -> asyncpg.Record:
    row = await pool.fetchrow(
        "SELECT status, cancel_requested, finished_at FROM imagen.jobs WHERE id = $1", job_id
    )
    assert row is not None
    return row


@pytest.mark.parametrize("form", ["claims", "legacy"])
async def test_a_user_sees_only_their_own_jobs(db: asyncpg.Pool, form: ClaimForm) -> None:
    mine = await add_job(db, ALICE)
    await add_job(db, BOB)

    async with request_as(db, "authenticated", ALICE, form=form) as conn:
        visible = await conn.fetch("SELECT id, owner_user_id FROM imagen.jobs")

    assert [(row["id"], row["owner_user_id"]) for row in visible] == [(mine, ALICE)]


async def test_a_user_cannot_read_another_users_job_by_id(db: asyncpg.Pool) -> None:
    bobs = await add_job(db, BOB)

    async with request_as(db, "authenticated", ALICE) as conn:
        row = await conn.fetchrow("SELECT * FROM imagen.jobs WHERE id = $1", bobs)

    assert row is None


async def test_a_user_cannot_cancel_another_users_job(db: asyncpg.Pool) -> None:
    bobs = await add_job(db, BOB)

    async with request_as(db, "authenticated", ALICE) as conn:
        result = await conn.execute("UPDATE imagen.jobs SET cancel_requested = true WHERE id = $1", bobs)

    assert result == "UPDATE 0"
    assert (await status_of(db, bobs))["status"] == "pending"


async def test_a_user_cannot_insert_a_job_owned_by_someone_else(db: asyncpg.Pool) -> None:
    with pytest.raises(asyncpg.InsufficientPrivilegeError, match="row-level security"):
        async with request_as(db, "authenticated", ALICE) as conn:
            await conn.execute("INSERT INTO imagen.jobs (owner_user_id, prompt) VALUES ($1, 'p')", BOB)

    assert await db.fetchval("SELECT count(*) FROM imagen.jobs") == 0


async def test_a_user_can_insert_their_own_job_and_it_starts_pending(db: asyncpg.Pool) -> None:
    async with request_as(db, "authenticated", ALICE) as conn:
        row = await conn.fetchrow(
            """INSERT INTO imagen.jobs (owner_user_id, prompt, width, height, params)
               VALUES ($1, 'a red fox', 512, 768, '{"cfg": 7}') RETURNING id, status""",
            ALICE,
        )

    assert row is not None
    assert row["status"] == "pending"
    assert (await status_of(db, row["id"]))["status"] == "pending"


async def test_a_user_may_name_only_the_backends_the_operator_opened(db: asyncpg.Pool) -> None:
    await db.execute("UPDATE imagen.settings SET web_backends = '{sd15, flux}'")
    try:
        for backend in ("sd15", "flux", None):  # None: the workers' default, always open
            async with request_as(db, "authenticated", ALICE) as conn:
                await conn.execute(
                    "INSERT INTO imagen.jobs (owner_user_id, prompt, backend) VALUES ($1, 'p', $2)",
                    ALICE,
                    backend,
                )
        refusals = []
        for backend in ("staff-only-sdxl", "no-such-backend"):  # one the operator runs, one it does not
            with pytest.raises(asyncpg.CheckViolationError) as caught:
                async with request_as(db, "authenticated", ALICE) as conn:
                    await conn.execute(
                        "INSERT INTO imagen.jobs (owner_user_id, prompt, backend) VALUES ($1, 'p', $2)",
                        ALICE,
                        backend,
                    )
            refusals.append((caught.value.args[0].replace(backend, "<name>"), caught.value.hint))
        await add_job(db, ALICE, backend="staff-only-sdxl")  # the operator is not limited
    finally:
        await db.execute("UPDATE imagen.settings SET web_backends = NULL")

    assert refusals[0] == refusals[1], "a backend the operator runs is refused like one it does not"
    assert refusals[0] == (
        'backend "<name>" is not available',
        "leave backend empty for the default, or name one the operator opened to web users",
    )
    assert await db.fetchval("SELECT count(*) FROM imagen.jobs") == 4


WORKER_OWNED_ON_INSERT = [
    pytest.param("status", "running", id="status"),
    pytest.param("attempts", 5, id="attempts"),
    pytest.param("priority", 100, id="priority"),
    pytest.param("max_attempts", 50, id="max_attempts"),
    pytest.param("run_at", None, id="run_at"),
    pytest.param("cancel_requested", True, id="cancel_requested"),
]


@pytest.mark.parametrize(("column", "value"), WORKER_OWNED_ON_INSERT)
async def test_a_user_cannot_insert_values_for_worker_owned_columns(
    db: asyncpg.Pool, column: str, value: Any
) -> None:
    with pytest.raises(asyncpg.InsufficientPrivilegeError, match="permission denied"):
        async with request_as(db, "authenticated", ALICE) as conn:
            await conn.execute(
                f"INSERT INTO imagen.jobs (owner_user_id, prompt, {column}) VALUES ($1, 'p', $2)",
                ALICE,
                value,
            )

    assert await db.fetchval("SELECT count(*) FROM imagen.jobs") == 0


WORKER_OWNED_ON_UPDATE = [
    pytest.param("status = 'done'", id="mark done"),
    pytest.param("status = 'pending'", id="set status"),
    pytest.param("image_id = $2", id="image_id"),
    pytest.param("attempts = 0", id="attempts"),
    pytest.param("owner_user_id = $3", id="owner_user_id"),
    pytest.param("prompt = 'something else'", id="prompt"),
    pytest.param("priority = 100", id="priority"),
]


@pytest.mark.parametrize("assignment", WORKER_OWNED_ON_UPDATE)
async def test_a_user_cannot_change_any_column_of_their_own_job_but_cancel_requested(
    db: asyncpg.Pool, assignment: str
) -> None:
    image = await add_image(db, ALICE)
    mine = await add_job(db, ALICE, status="failed", attempts=3)

    with pytest.raises(asyncpg.InsufficientPrivilegeError, match="permission denied"):
        async with request_as(db, "authenticated", ALICE) as conn:
            await conn.execute(
                f"UPDATE imagen.jobs SET {assignment} WHERE id = $1 AND $2::uuid IS NOT NULL "
                "AND $3::uuid IS NOT NULL",
                mine,
                image,
                WORKER,
            )

    row = await db.fetchrow("SELECT status, attempts, image_id FROM imagen.jobs WHERE id = $1", mine)
    assert row is not None
    assert tuple(row) == ("failed", 3, None)


async def test_a_user_cancelling_their_pending_job_cancels_it_at_once(db: asyncpg.Pool) -> None:
    mine = await add_job(db, ALICE)

    async with request_as(db, "authenticated", ALICE) as conn:
        result = await conn.execute("UPDATE imagen.jobs SET cancel_requested = true WHERE id = $1", mine)

    assert result == "UPDATE 1"
    row = await status_of(db, mine)
    assert row["status"] == "cancelled"
    assert row["cancel_requested"] is True
    assert row["finished_at"] is not None


async def test_a_user_sees_only_their_own_images(db: asyncpg.Pool) -> None:
    mine = await add_image(db, ALICE)
    await add_image(db, BOB)

    async with request_as(db, "authenticated", ALICE) as conn:
        visible = await conn.fetch("SELECT id FROM imagen.images")

    assert [row["id"] for row in visible] == [mine]


async def test_a_signed_in_request_without_a_subject_sees_no_rows(db: asyncpg.Pool) -> None:
    await add_job(db, ALICE)
    await add_image(db, ALICE)

    async with request_as(db, "authenticated") as conn:
        jobs = await conn.fetch("SELECT id FROM imagen.jobs")
        images = await conn.fetch("SELECT id FROM imagen.images")

    assert jobs == images == []


@pytest.mark.parametrize("table", ["workers", "schema_migrations"])
async def test_a_user_cannot_read_worker_tables(db: asyncpg.Pool, table: str) -> None:
    with pytest.raises(asyncpg.InsufficientPrivilegeError, match="permission denied"):
        async with request_as(db, "authenticated", ALICE) as conn:
            await conn.fetch(f"SELECT * FROM imagen.{table}")


@pytest.mark.parametrize("table", ["jobs", "images"])
async def test_anon_sees_no_row(db: asyncpg.Pool, table: str) -> None:
    await add_job(db, ALICE)
    await add_image(db, ALICE)

    with pytest.raises(asyncpg.InsufficientPrivilegeError, match="permission denied for schema imagen"):
        async with request_as(db, "anon") as conn:
            await conn.fetch(f"SELECT * FROM imagen.{table}")


async def test_anon_cannot_insert_a_job(db: asyncpg.Pool) -> None:
    with pytest.raises(asyncpg.InsufficientPrivilegeError, match="permission denied"):
        async with request_as(db, "anon", ALICE) as conn:
            await conn.execute("INSERT INTO imagen.jobs (owner_user_id, prompt) VALUES ($1, 'p')", ALICE)

    assert await db.fetchval("SELECT count(*) FROM imagen.jobs") == 0


async def test_claims_from_an_earlier_request_on_the_same_connection_do_not_leak(db: asyncpg.Pool) -> None:
    alices = await add_job(db, ALICE)
    bobs = await add_job(db, BOB)

    async with db.acquire() as conn:
        async with request_on(conn, "authenticated", ALICE, form="legacy") as request:
            first = await request.fetch("SELECT id FROM imagen.jobs")
        async with request_on(conn, "authenticated", BOB, form="claims") as request:
            second = await request.fetch("SELECT id FROM imagen.jobs")
        async with request_on(conn, "authenticated") as request:
            third = await request.fetch("SELECT id FROM imagen.jobs")

    assert [row["id"] for row in first] == [alices]
    assert [row["id"] for row in second] == [bobs]
    assert third == []
