"""Migration 0008: the outbox is filled by the database and hidden from the web app's roles."""

from __future__ import annotations

import json
import uuid

import asyncpg
import pytest

from tests.workers import insert_job

OWNER = uuid.UUID("00000000-0000-4000-8000-00000000b0b0")


async def enable(db: asyncpg.Pool, *events: str) -> None:
    await db.execute("INSERT INTO imagen.webhook_settings (events) VALUES ($1)", list(events))


async def test_an_owner_cancelling_a_pending_job_through_rls_queues_its_webhook(
    outbox_db: asyncpg.Pool,
) -> None:
    await enable(outbox_db, "cancelled")
    job_id = await insert_job(outbox_db, owner_user_id=OWNER)
    async with outbox_db.acquire() as conn, conn.transaction():
        await conn.execute("SET LOCAL ROLE authenticated")
        await conn.execute(
            "SELECT set_config('request.jwt.claims', $1, true)", json.dumps({"sub": str(OWNER)})
        )
        await conn.execute("UPDATE imagen.jobs SET cancel_requested = true WHERE id = $1", job_id)

    rows = await outbox_db.fetch("SELECT * FROM imagen.webhook_deliveries WHERE job_id = $1", job_id)
    assert [(r["event"], r["status"], r["attempts"]) for r in rows] == [("cancelled", "pending", 0)]


@pytest.mark.parametrize("role", ["anon", "authenticated"])
@pytest.mark.parametrize("table", ["webhook_deliveries", "webhook_settings"])
async def test_the_web_apps_roles_cannot_read_or_write_the_outbox(
    outbox_db: asyncpg.Pool, role: str, table: str
) -> None:
    async with outbox_db.acquire() as conn:
        for statement in (f"SELECT * FROM imagen.{table}", f"DELETE FROM imagen.{table}"):
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                async with conn.transaction():
                    await conn.execute(f"SET LOCAL ROLE {role}")
                    await conn.execute(statement)


async def test_nothing_is_queued_while_webhooks_are_off_and_each_ending_once_when_on(
    outbox_db: asyncpg.Pool,
) -> None:
    quiet = await insert_job(outbox_db)
    await outbox_db.execute("UPDATE imagen.jobs SET status = 'cancelled' WHERE id = $1", quiet)
    await enable(outbox_db, "done", "failed", "cancelled")
    job_id = await insert_job(outbox_db)
    await outbox_db.execute("UPDATE imagen.jobs SET status = 'failed', error = 'x' WHERE id = $1", job_id)
    await outbox_db.execute("UPDATE imagen.jobs SET error = 'y' WHERE id = $1", job_id)  # no transition

    events = await outbox_db.fetch("SELECT job_id, event FROM imagen.webhook_deliveries")
    assert [(r["job_id"], r["event"]) for r in events] == [(job_id, "failed")]


async def test_garbage_is_refused(outbox_db: asyncpg.Pool) -> None:
    with pytest.raises(asyncpg.CheckViolationError):
        await enable(outbox_db, "started")
    with pytest.raises(asyncpg.CheckViolationError):
        await outbox_db.execute(
            "INSERT INTO imagen.webhook_deliveries (job_id, event, status) VALUES ($1, 'done', 'sent')",
            uuid.uuid4(),
        )
    with pytest.raises(asyncpg.CheckViolationError):
        await outbox_db.execute(
            "INSERT INTO imagen.webhook_deliveries (job_id, event, status) VALUES ($1, 'done', 'delivered')",
            uuid.uuid4(),
        )
