"""Triggers: wake-ups on imagen_jobs, events on imagen_job_events, cancel on imagen_control.

Each test listens on a dedicated connection (never a pool connection, never inside a
transaction) and collects notifications for a short window after the change commits.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest

from imagen_worker.db.connect import connect

OWNER = uuid.UUID("00000000-0000-4000-8000-0000000000a1")
WINDOW = 0.25  # seconds: loopback delivery takes well under a millisecond

Listen = Callable[[str], Awaitable[list[str]]]


@pytest.fixture
async def listen(database_url: str, db: asyncpg.Pool) -> AsyncIterator[Listen]:
    """``await listen(channel)`` starts collecting payloads of ``channel`` into the returned list."""
    conn = await connect(database_url)

    async def start(channel: str) -> list[str]:
        received: list[str] = []

        def on_notify(_conn: Any, _pid: int, _channel: str, payload: str) -> None:
            received.append(payload)

        await conn.add_listener(channel, on_notify)
        return received

    yield start
    await conn.close()


async def settle() -> None:
    await asyncio.sleep(WINDOW)


async def add_job(pool: asyncpg.Pool, **columns: Any) -> uuid.UUID:
    row = {"owner_user_id": OWNER, "prompt": "a lighthouse at dusk", **columns}
    placeholders = ", ".join(f"${i}" for i in range(1, len(row) + 1))
    job_id: uuid.UUID = await pool.fetchval(
        f"INSERT INTO imagen.jobs ({', '.join(row)}) VALUES ({placeholders}) RETURNING id", *row.values()
    )
    return job_id


async def add_running_job(pool: asyncpg.Pool) -> uuid.UUID:
    return await add_job(pool, status="running", lease_expires_at=datetime.now(UTC) + timedelta(seconds=30))


async def test_a_runnable_pending_insert_notifies_imagen_jobs_once_with_its_backend(
    db: asyncpg.Pool, listen: Listen
) -> None:
    wakeups = await listen("imagen_jobs")

    await add_job(db, backend="comfyui")
    await settle()

    assert wakeups == ["comfyui"]


async def test_a_pending_insert_without_a_backend_notifies_an_empty_payload(
    db: asyncpg.Pool, listen: Listen
) -> None:
    wakeups = await listen("imagen_jobs")

    await add_job(db)
    await settle()

    assert wakeups == [""]


async def test_an_update_of_a_pending_job_does_not_notify_imagen_jobs(
    db: asyncpg.Pool, listen: Listen
) -> None:
    job_id = await add_job(db)
    wakeups = await listen("imagen_jobs")

    await db.execute("UPDATE imagen.jobs SET priority = 10, run_at = now() WHERE id = $1", job_id)
    await settle()

    assert wakeups == []


async def test_a_job_scheduled_in_the_future_does_not_notify_imagen_jobs(
    db: asyncpg.Pool, listen: Listen
) -> None:
    wakeups = await listen("imagen_jobs")

    await add_job(db, run_at=datetime.now(UTC) + timedelta(minutes=5))
    await settle()

    assert wakeups == []


async def test_a_status_update_notifies_imagen_job_events_with_only_id_and_status(
    db: asyncpg.Pool, listen: Listen
) -> None:
    job_id = await add_job(db)
    events = await listen("imagen_job_events")

    await db.execute(
        """UPDATE imagen.jobs SET status = 'running', attempts = 1,
                  lease_expires_at = now() + interval '30 seconds' WHERE id = $1""",
        job_id,
    )
    await settle()

    assert [json.loads(payload) for payload in events] == [{"id": str(job_id), "status": "running"}]


async def test_a_progress_update_notifies_imagen_job_events(db: asyncpg.Pool, listen: Listen) -> None:
    job_id = await add_running_job(db)
    events = await listen("imagen_job_events")

    await db.execute("""UPDATE imagen.jobs SET progress = '{"value": 3, "max": 30}' WHERE id = $1""", job_id)
    await settle()

    assert [json.loads(payload) for payload in events] == [{"id": str(job_id), "status": "running"}]


async def test_a_heartbeat_that_changes_neither_status_nor_progress_notifies_nothing(
    db: asyncpg.Pool, listen: Listen
) -> None:
    job_id = await add_running_job(db)
    events = await listen("imagen_job_events")

    await db.execute(
        "UPDATE imagen.jobs SET lease_expires_at = now() + interval '60 seconds', updated_at = now() "
        "WHERE id = $1",
        job_id,
    )
    await settle()

    assert events == []


async def test_requesting_cancel_of_a_running_job_notifies_imagen_control_and_leaves_it_running(
    db: asyncpg.Pool, listen: Listen
) -> None:
    job_id = await add_running_job(db)
    control = await listen("imagen_control")
    events = await listen("imagen_job_events")

    await db.execute("UPDATE imagen.jobs SET cancel_requested = true WHERE id = $1", job_id)
    await settle()

    assert [json.loads(payload) for payload in control] == [{"cancel": str(job_id)}]
    assert events == []
    row = await db.fetchrow("SELECT status, cancel_requested FROM imagen.jobs WHERE id = $1", job_id)
    assert row is not None
    assert tuple(row) == ("running", True)


async def test_requesting_cancel_of_a_pending_job_cancels_it_and_notifies_imagen_job_events(
    db: asyncpg.Pool, listen: Listen
) -> None:
    job_id = await add_job(db)
    control = await listen("imagen_control")
    events = await listen("imagen_job_events")

    await db.execute("UPDATE imagen.jobs SET cancel_requested = true WHERE id = $1", job_id)
    await settle()

    assert [json.loads(payload) for payload in events] == [{"id": str(job_id), "status": "cancelled"}]
    assert control == []
    row = await db.fetchrow("SELECT status, error, finished_at FROM imagen.jobs WHERE id = $1", job_id)
    assert row is not None
    assert row["status"] == "cancelled"
    assert row["error"] == "cancelled by its owner before it started"
    assert row["finished_at"] is not None


@pytest.mark.parametrize("final_status", ["failed", "cancelled"])
async def test_requesting_cancel_of_a_finished_job_changes_nothing(
    db: asyncpg.Pool, listen: Listen, final_status: str
) -> None:
    job_id = await add_job(db, status=final_status)
    control = await listen("imagen_control")
    events = await listen("imagen_job_events")

    await db.execute("UPDATE imagen.jobs SET cancel_requested = true WHERE id = $1", job_id)
    await settle()

    row = await db.fetchrow("SELECT status, cancel_requested FROM imagen.jobs WHERE id = $1", job_id)
    assert row is not None
    assert tuple(row) == (final_status, False)
    assert control == events == []


async def test_a_cancel_request_on_a_live_job_cannot_be_taken_back(db: asyncpg.Pool) -> None:
    job_id = await db.fetchval(
        "INSERT INTO imagen.jobs (owner_user_id, prompt, status, lease_expires_at) "
        "VALUES (gen_random_uuid(), 'p', 'running', now() + interval '1 minute') "
        "RETURNING id"
    )
    await db.execute("UPDATE imagen.jobs SET cancel_requested = true WHERE id = $1", job_id)
    await db.execute("UPDATE imagen.jobs SET cancel_requested = false WHERE id = $1", job_id)
    assert await db.fetchval("SELECT cancel_requested FROM imagen.jobs WHERE id = $1", job_id) is True
