"""Deliveries survive the worker: a killed or stopped worker's pending webhooks are sent by the next."""

from __future__ import annotations

import asyncio
import signal
import time
import uuid
from pathlib import Path

import asyncpg
import pytest

from imagen_worker.webhooks import signing
from tests.webhooks.conftest import SECRET, Receiver, hooks_block
from tests.workers import WorkerProcess, eventually, insert_job, terminal, wait_registered, write_config

SECRET_ENV = "HOOK_SIGNING_SECRET"  # not IMAGEN_*: worker_env() passes the rest of the environment


@pytest.fixture
def signing_secret(monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv(SECRET_ENV, SECRET)
    return SECRET


async def delivery(db: asyncpg.Pool, job_id: uuid.UUID) -> asyncpg.Record | None:
    return await db.fetchrow("SELECT * FROM imagen.webhook_deliveries WHERE job_id = $1", job_id)


async def status_of(db: asyncpg.Pool, job_id: uuid.UUID, wanted: str) -> asyncpg.Record | None:
    row = await delivery(db, job_id)
    return row if row is not None and row["status"] == wanted else None


def logs_of(tmp_path: Path) -> bytes:
    return b"".join(path.read_bytes() for path in sorted(tmp_path.glob("worker-*.log")))


async def test_a_worker_killed_mid_delivery_leaves_it_to_the_next_worker(
    outbox_db: asyncpg.Pool, database_url: str, tmp_path: Path, receiver: Receiver, signing_secret: str
) -> None:
    receiver.script = ["hang"]  # the first POST never gets an answer
    config = write_config(tmp_path, webhooks=hooks_block(receiver.url, secret_env=SECRET_ENV, timeout=1.5))
    first = WorkerProcess(database_url, config, tmp_path / "worker-1.log")
    try:
        await wait_registered(outbox_db, first)
        job_id = await insert_job(outbox_db)
        await eventually(lambda: _received(receiver, 1), within=15)
        first.proc.send_signal(signal.SIGKILL)  # committed done, POST in flight, nothing recorded
        first.wait(timeout=10)
    finally:
        first.stop()
    job = await terminal(outbox_db, job_id, within=1)
    assert job["status"] == "done"
    row = await delivery(outbox_db, job_id)
    assert row is not None and row["status"] == "pending" and row["claimed_by"] is not None

    receiver.release()
    second = WorkerProcess(database_url, config, tmp_path / "worker-2.log")
    try:
        delivered = await eventually(lambda: status_of(outbox_db, job_id, "delivered"), within=20)
    finally:
        second.stop()

    assert delivered["attempts"] == 1
    ids = {r.headers[signing.DELIVERY] for r in receiver.requests}
    assert ids == {str(delivered["id"])} and len(receiver.requests) >= 2
    last = receiver.requests[-1]
    assert signing.verify(SECRET.encode(), last.headers, last.body, now=time.time())
    assert SECRET.encode() not in logs_of(tmp_path)


async def test_a_stopped_worker_hands_its_retries_to_the_next_and_never_logs_the_secret(
    outbox_db: asyncpg.Pool, database_url: str, tmp_path: Path, receiver: Receiver, signing_secret: str
) -> None:
    receiver.default = 503  # the receiver is down
    block = hooks_block(receiver.url, secret_env=SECRET_ENV, max_attempts=50, backoff_max=0.3)
    config = write_config(tmp_path, webhooks=block)
    first = WorkerProcess(database_url, config, tmp_path / "worker-1.log")
    try:
        await wait_registered(outbox_db, first)
        job_id = await insert_job(outbox_db)
        await eventually(lambda: _received(receiver, 3), within=15)
        first.signal(signal.SIGTERM)
        assert first.wait(timeout=30) == 0
    finally:
        first.stop()
    row = await delivery(outbox_db, job_id)
    assert row is not None and row["status"] == "pending" and row["claimed_by"] is None
    assert row["attempts"] >= 3 and "HTTP 503" in row["last_error"]

    receiver.default = 200
    second = WorkerProcess(database_url, config, tmp_path / "worker-2.log")
    try:
        await wait_registered(outbox_db, second)
        delivered = await eventually(lambda: status_of(outbox_db, job_id, "delivered"), within=5)
    finally:
        second.stop()

    assert delivered["attempts"] == row["attempts"] + 1
    logs = logs_of(tmp_path)
    assert b"webhook attempt failed" in logs and b"webhook delivered" in logs
    assert SECRET.encode() not in logs
    last = receiver.requests[-1]
    assert signing.verify(SECRET.encode(), last.headers, last.body, now=time.time())


async def _received(receiver: Receiver, count: int) -> bool:
    await asyncio.sleep(0)
    return len(receiver.requests) >= count
