"""One execution per attempt: leases are renewed per (job, attempt), never waited on, never
re-taken by their own holder, and given up before they can expire; control messages are hints."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import asyncpg
import pytest

from imagen_worker.backends.base import GenerateRequest, GenerateResult, JobContext
from imagen_worker.backends.mock import MockBackend
from imagen_worker.queue.jobs import Queue
from imagen_worker.worker.daemon import Liveness, Worker
from tests.workers import eventually, insert_job, job_row, make_config, running_worker, terminal


async def _status(db: asyncpg.Pool, job_id: uuid.UUID) -> str:
    return str((await job_row(db, job_id))["status"])


async def _running(db: asyncpg.Pool, *job_ids: uuid.UUID) -> bool:
    return all([await _status(db, job_id) == "running" for job_id in job_ids])


class Stoppable(MockBackend):
    """Renders in ``seconds`` unless cancelled; remembers when and why it was cancelled."""

    seconds = 60.0
    stops: list[tuple[uuid.UUID, datetime, bool]]

    async def generate(self, request: GenerateRequest, ctx: JobContext) -> GenerateResult:
        try:
            await asyncio.sleep(self.seconds)
        except asyncio.CancelledError:
            self.stops.append((request.job_id, datetime.now(UTC), ctx.cancel_requested))
            raise
        return await super().generate(request, ctx)


def stoppable(worker: Worker, seconds: float) -> Stoppable:
    backend = Stoppable.from_config("mock", {"type": "mock", "capacity": 4})
    backend.seconds, backend.stops = seconds, []
    backend.watch(worker.wake.set)
    worker.backends["mock"] = backend
    return backend


async def forge_as_authenticated(db: asyncpg.Pool, payload: str) -> None:
    async with db.acquire() as conn, conn.transaction():
        await conn.execute("SET LOCAL ROLE authenticated")
        await conn.execute("SELECT pg_notify('imagen_control', $1)", payload)


async def forge_as_login_role(server_dsn: str, database_url: str, payload: str) -> None:
    """A plain login role with no grants at all: anyone who can connect can NOTIFY."""
    role = f"imagen_forger_{uuid.uuid4().hex[:10]}"
    admin = await asyncpg.connect(server_dsn)
    try:
        await admin.execute(f'CREATE ROLE "{role}" LOGIN')
        forger = await asyncpg.connect(database_url, user=role)
        try:
            await forger.execute("SELECT pg_notify('imagen_control', $1)", payload)
        finally:
            await forger.close()
    finally:
        await admin.execute(f'DROP ROLE IF EXISTS "{role}"')
        await admin.close()


async def test_forged_control_messages_cancel_nothing_and_a_real_cancel_still_works(
    db: asyncpg.Pool, database_url: str, server_dsn: str, tmp_path: Path
) -> None:
    config = make_config(tmp_path, backends={"mock": {"type": "mock", "latency_ms": 60000}})
    async with running_worker(config, database_url) as worker:
        job_id = await insert_job(db, "someone else's job", steps=200)
        await eventually(lambda: _running(db, job_id))
        forged = json.dumps({"cancel": str(job_id)})
        await forge_as_authenticated(db, forged)
        await forge_as_login_role(server_dsn, database_url, forged)
        await forge_as_authenticated(db, "not json at all")
        await asyncio.sleep(1.0)  # far longer than a real cancel takes (see below)
        row = await job_row(db, job_id)
        assert row["status"] == "running" and not row["cancel_requested"], "a message alone cancels nothing"
        assert len(worker.running) == 1

        asked = time.monotonic()
        await Queue(db).request_cancel(job_id)
        row = await terminal(db, job_id, within=5)
        took = time.monotonic() - asked
    assert row["status"] == "cancelled" and row["error"] == "cancelled by its owner"
    assert took < 2, "the real cancel's NOTIFY is acted on at once, after re-reading the row"


async def test_the_claim_never_retakes_a_job_its_own_worker_is_running(
    db: asyncpg.Pool, database_url: str, tmp_path: Path
) -> None:
    config = make_config(tmp_path, worker={"lease_seconds": 30, "poll_interval": 0.2})
    async with running_worker(config, database_url) as worker:
        backend = stoppable(worker, seconds=1.5)
        job_id = await insert_job(db, "run me once")
        await eventually(lambda: _running(db, job_id))
        # As after a database outage: the lease ran out while the job still runs here.
        await db.execute(
            "UPDATE imagen.jobs SET lease_expires_at = now() - interval '1 s' WHERE id = $1", job_id
        )
        await db.execute("SELECT pg_notify('imagen_jobs', '')")
        await asyncio.sleep(0.6)  # three polls and a NOTIFY: every chance to re-claim
        assert (await job_row(db, job_id))["attempts"] == 1
        row = await terminal(db, job_id, within=10)
    assert row["status"] == "done" and row["attempts"] == 1
    assert backend.stops == [], "the one execution was never interrupted"
    assert await db.fetchval("SELECT count(*) FROM imagen.images WHERE job_id = $1", job_id) == 1


async def test_a_locked_row_delays_only_its_own_lease_and_that_job_stops_before_its_lease_expires(
    db: asyncpg.Pool, database_url: str, tmp_path: Path
) -> None:
    config = make_config(tmp_path, worker={"lease_seconds": 4.5, "poll_interval": 0.2})
    async with running_worker(config, database_url) as worker:
        backend = stoppable(worker, seconds=4.5)
        locked_id = await insert_job(db, "locked by someone")
        free_id = await insert_job(db, "free")
        await eventually(lambda: _running(db, locked_id, free_id))
        holder = await asyncpg.connect(database_url)
        try:
            async with holder.transaction():
                lease = await holder.fetchval(
                    "SELECT lease_expires_at FROM imagen.jobs WHERE id = $1 FOR UPDATE", locked_id
                )
                free_lease = (await job_row(db, free_id))["lease_expires_at"]
                await asyncio.sleep(4)  # longer than two thirds of the lease (3 s)
                renewed_free_lease = (await job_row(db, free_id))["lease_expires_at"]
        finally:
            await holder.close()
        rows = {job: await terminal(db, job, within=20) for job in (locked_id, free_id)}

    assert renewed_free_lease > free_lease, "the other job's lease kept being renewed"
    assert rows[free_id]["status"] == "done" and rows[free_id]["attempts"] == 1
    ((stopped_job, stopped_at, owner_cancel),) = backend.stops
    assert stopped_job == locked_id, "only the job whose row was locked was stopped"
    assert stopped_at < lease, "the holder gave the job up before its lease could expire"
    assert not owner_cancel, "letting go is not an owner's cancel: remote work may go on"
    assert rows[locked_id]["status"] == "done"
    assert rows[locked_id]["attempts"] == 1, "handed back once the lock went: the stall cost no attempt"
    assert rows[locked_id]["started_at"] < stopped_at
    images = await db.fetchval("SELECT count(*) FROM imagen.images WHERE job_id = $1", locked_id)
    assert images == 1


async def test_worker_sessions_carry_the_configured_database_timeouts(
    db: asyncpg.Pool, database_url: str, tmp_path: Path
) -> None:
    config = make_config(tmp_path, database={"lock_timeout": 2.5, "idle_in_transaction_session_timeout": 0})
    async with running_worker(config, database_url) as worker, worker.pool.acquire() as conn:
        settings = {
            name: await conn.fetchval(f"SHOW {name}")
            for name in ("statement_timeout", "lock_timeout", "idle_in_transaction_session_timeout")
        }
    config = make_config(tmp_path, database={"command_timeout": 0.3, "statement_timeout": 0})
    async with running_worker(config, database_url) as worker:
        started = time.monotonic()
        with pytest.raises(TimeoutError):
            await worker.pool.execute("SELECT pg_sleep(5)")
        client_side = time.monotonic() - started
    assert settings == {
        "statement_timeout": "30s",
        "lock_timeout": "2500ms",
        "idle_in_transaction_session_timeout": "0",
    }
    assert client_side < 2, "command_timeout bounds a statement even when the server sets no limit"


def test_the_watchdog_sees_a_stuck_claim_or_a_silent_heartbeat() -> None:
    liveness = Liveness()
    assert liveness.progressing(within=30)
    liveness.claim_busy_since = time.monotonic() - 31
    assert not liveness.progressing(within=30), "one claim iteration stuck for longer than allowed"
    liveness.claim_busy_since = None
    liveness.heartbeat_at = time.monotonic() - 31
    assert not liveness.progressing(within=30), "no heartbeat iteration completed"
