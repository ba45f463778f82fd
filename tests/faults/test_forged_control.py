"""Forged control messages: anyone who can connect can ``pg_notify('imagen_control', ...)``.

A web user (role ``authenticated``, via ``SET ROLE`` as PostgREST does) and a plain login role
each send a cancel for someone else's running job, in the exact format the worker listens
for. The messages are hints at most: a running job is cancelled only when its row says
``cancel_requested``. A job whose owner really cancels it, alongside, shows the listener was
listening.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

from tests.faults.harness import FaultWorker, Fleet, insert_jobs, running_on, settled
from tests.faults.ledger import assert_each_done_exactly_once
from tests.workers import eventually, terminal

pytestmark = pytest.mark.slow


@pytest.fixture
async def login_role(database_url: str) -> AsyncIterator[str]:
    """A plain login role with no grants on the imagen schema (roles are cluster-wide)."""
    name = f"imagen_forger_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(database_url)
    try:
        await admin.execute(f'CREATE ROLE "{name}" LOGIN')
        yield name
    finally:
        await admin.execute(f'DROP ROLE IF EXISTS "{name}"')
        await admin.close()


def as_user(dsn: str, user: str) -> str:
    parts = urlsplit(dsn)
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{user}@{host}"))


async def test_forged_cancels_never_stop_a_running_job(
    db: asyncpg.Pool, database_url: str, tmp_path: Path, login_role: str
) -> None:
    async with Fleet(database_url, tmp_path) as fleet:
        worker = fleet.add(
            "worker",
            backends={"gpu": fleet.backend(latency_ms=4000, capacity=3)},
            # A lease long enough that a heartbeat slowed by a loaded machine stops no render:
            # a render stopped for its lease would look like one a forged message interrupted.
            worker={"poll_interval": 0.5, "concurrency": 3, "lease_seconds": 10},
        )
        await worker.start()
        targets = await insert_jobs(db, 2, backend="gpu", label="someone else's")
        (really_cancelled,) = await insert_jobs(db, 1, backend="gpu", label="cancelled by its owner")
        await eventually(lambda: _count_running(db, worker, 3), within=15)

        web_user = await asyncpg.connect(database_url)
        stranger = await asyncpg.connect(as_user(database_url, login_role))
        try:
            await web_user.execute("SET ROLE authenticated")
            assert await web_user.fetchval("SELECT current_user") == "authenticated"
            assert await stranger.fetchval("SELECT current_user") == login_role
            for conn in (web_user, stranger):
                for job in targets:
                    payload = json.dumps({"cancel": str(job)})
                    await conn.execute("SELECT pg_notify('imagen_control', $1)", payload)
        finally:
            await web_user.close()
            await stranger.close()
        await asyncio.sleep(1.0)  # a listener acts within milliseconds
        await db.execute("UPDATE imagen.jobs SET cancel_requested = true WHERE id = $1", really_cancelled)
        cancelled = await terminal(db, really_cancelled, within=10)
        await settled(db, targets, within=20)

    assert cancelled["status"] == "cancelled", "the owner's real cancel still works"
    rows = await db.fetch("SELECT cancel_requested FROM imagen.jobs WHERE id = ANY($1::uuid[])", targets)
    assert [row["cancel_requested"] for row in rows] == [False, False]
    runs = await assert_each_done_exactly_once(db, fleet.ledger, targets, attempts=1)
    assert [run.outcome for run in runs] == ["ok", "ok"], "the forged messages interrupted nothing"


async def _count_running(db: asyncpg.Pool, worker: FaultWorker, count: int) -> bool:
    return len(await running_on(db, worker)) == count
