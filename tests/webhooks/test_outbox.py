"""Completion webhooks from a real worker to a loopback receiver: signed, retried, recorded."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import time
import uuid
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from structlog.testing import capture_logs

from imagen_worker.errors import ConfigError
from imagen_worker.webhooks import signing
from imagen_worker.webhooks.outbox import Outcome
from imagen_worker.worker.daemon import Worker
from tests.fakes.storage import FakeStorage
from tests.webhooks.conftest import Receiver, hooks_block
from tests.workers import eventually, insert_job, make_config, running_worker, terminal


async def delivery_rows(db: asyncpg.Pool, job_id: uuid.UUID) -> list[asyncpg.Record]:
    rows: list[asyncpg.Record] = await db.fetch(
        "SELECT * FROM imagen.webhook_deliveries WHERE job_id = $1 ORDER BY created_at", job_id
    )
    return rows


async def settled(db: asyncpg.Pool, job_id: uuid.UUID, *, within: float = 10.0) -> asyncpg.Record:
    """The job's delivery row once it is delivered or failed."""

    async def check() -> asyncpg.Record | None:
        rows = await delivery_rows(db, job_id)
        return rows[0] if rows and rows[0]["status"] != "pending" else None

    row: asyncpg.Record = await eventually(check, within=within)
    return row


def keys(value: Any) -> set[str]:
    if isinstance(value, dict):
        return set(value) | {k for item in value.values() for k in keys(item)}
    if isinstance(value, list):
        return {k for item in value for k in keys(item)}
    return set()


async def test_a_finished_job_is_posted_once_signed_over_timestamp_and_body(
    outbox_db: asyncpg.Pool, database_url: str, tmp_path: Path, receiver: Receiver, secret: str,
    storage: FakeStorage,
) -> None:  # fmt: skip
    config = make_config(
        tmp_path, storage={"type": "supabase", "max_retries": 0}, webhooks=hooks_block(receiver.url)
    )
    async with running_worker(config, database_url) as worker:
        job_id = await insert_job(outbox_db)
        job = await terminal(outbox_db, job_id)
        row = await settled(outbox_db, job_id)

    assert job["status"] == "done"
    assert row["status"] == "delivered" and row["attempts"] == 1 and row["delivered_at"] is not None
    assert row["last_error"] is None
    [request] = receiver.requests
    stamp = request.headers[signing.TIMESTAMP]
    expected = hmac.new(secret.encode(), f"{stamp}.".encode() + request.body, hashlib.sha256).hexdigest()
    assert request.headers[signing.SIGNATURE] == f"sha256={expected}"
    assert abs(int(stamp) - time.time()) < 30
    assert signing.verify(secret.encode(), request.headers, request.body, now=time.time())
    assert not signing.verify(b"another-secret-0123456789", request.headers, request.body, now=time.time())
    assert not signing.verify(secret.encode(), request.headers, request.body + b" ", now=time.time())
    assert not signing.verify(secret.encode(), request.headers, request.body, now=time.time() + 600)
    assert request.headers[signing.DELIVERY] == str(row["id"])
    assert request.headers[signing.EVENT] == "done"

    payload = request.json
    image = await outbox_db.fetchrow("SELECT * FROM imagen.images WHERE id = $1", job["image_id"])
    assert payload["id"] == str(row["id"]) and payload["event"] == "done"
    assert payload["job"]["id"] == str(job_id)
    assert payload["job"]["owner_user_id"] == str(job["owner_user_id"])
    assert payload["job"]["status"] == "done" and payload["job"]["error"] is None
    assert payload["job"]["finished_at"] is not None and payload["job"]["image_id"] == str(image["id"])
    assert [i["storage_path"] for i in payload["job"]["images"]] == [image["storage_path"]]
    assert not image["storage_path"].startswith("local:")
    assert payload["job"]["images"][0]["sha256"] == image["sha256"]
    # Nothing internal: no worker, lease, backend reference or local path.
    text = request.body.decode()
    assert str(worker.id) not in text and str(tmp_path) not in text
    assert not keys(payload) & {"worker_id", "backend_ref", "local_path", "sidecar", "error_detail", "params"}


async def test_503_is_retried_with_backoff_until_the_receiver_accepts(
    outbox_db: asyncpg.Pool, database_url: str, tmp_path: Path, receiver: Receiver, secret: str
) -> None:
    receiver.script = [503, 503]
    config = make_config(tmp_path, webhooks=hooks_block(receiver.url))
    async with running_worker(config, database_url) as worker:
        outcomes: list[Outcome] = []
        worker.webhook_hooks.append(outcomes.append)
        job_id = await insert_job(outbox_db)
        row = await settled(outbox_db, job_id)

    assert row["status"] == "delivered" and row["attempts"] == 3
    assert row["last_error"] == "the receiver answered HTTP 503 Service Unavailable"
    assert len(receiver.requests) == 3
    assert len({r.headers[signing.DELIVERY] for r in receiver.requests}) == 1
    assert len({r.body for r in receiver.requests}) == 1
    gaps = [b.at - a.at for a, b in zip(receiver.requests, receiver.requests[1:], strict=False)]
    assert all(gap >= 0.04 for gap in gaps), gaps
    assert outcomes == [Outcome.RETRIED, Outcome.RETRIED, Outcome.DELIVERED]


async def test_a_400_is_not_retried_and_the_failure_is_recorded(
    outbox_db: asyncpg.Pool, database_url: str, tmp_path: Path, receiver: Receiver, secret: str
) -> None:
    receiver.script = [400]
    config = make_config(tmp_path, webhooks=hooks_block(receiver.url))
    async with running_worker(config, database_url):
        job_id = await insert_job(outbox_db)
        row = await settled(outbox_db, job_id)
        await terminal(outbox_db, job_id)
        await asyncio.sleep(0.5)  # room for a retry that must not come

    assert row["status"] == "failed" and row["attempts"] == 1
    assert row["last_error"] == "the receiver answered HTTP 400 Bad Request"
    assert len(receiver.requests) == 1


async def test_retries_stop_at_max_attempts_and_the_last_error_stays(
    outbox_db: asyncpg.Pool, database_url: str, tmp_path: Path, receiver: Receiver, secret: str
) -> None:
    receiver.default = 500
    config = make_config(tmp_path, webhooks=hooks_block(receiver.url, max_attempts=3))
    async with running_worker(config, database_url):
        job_id = await insert_job(outbox_db)
        row = await settled(outbox_db, job_id)

    assert row["status"] == "failed" and row["attempts"] == 3
    assert row["last_error"] == "the receiver answered HTTP 500 Internal Server Error"
    assert len(receiver.requests) == 3


async def test_a_slow_receiver_never_delays_the_jobs_completion(
    outbox_db: asyncpg.Pool, database_url: str, tmp_path: Path, receiver: Receiver, secret: str
) -> None:
    receiver.delay = 2.0
    config = make_config(tmp_path, webhooks=hooks_block(receiver.url, timeout=5, concurrency=1))
    async with running_worker(config, database_url):
        first = await insert_job(outbox_db, "the first")
        await eventually(lambda: _received(receiver, 1))  # the receiver is now busy with it
        started = time.monotonic()
        second = await insert_job(outbox_db, "the second")
        job = await terminal(outbox_db, second, within=5)
        took = time.monotonic() - started
        assert len(receiver.requests) == 1, "the second job ended while the first POST was in flight"
        await settled(outbox_db, first)
        row = await settled(outbox_db, second, within=10)

    assert job["status"] == "done"
    # Local storage only: the image's file: URL is a worker's disk, never announced.
    [image] = receiver.requests[-1].json["job"]["images"]
    assert image["storage_path"] is None and "local:" not in receiver.requests[-1].body.decode()
    assert took < 1.5, f"the job took {took:.2f}s while a receiver took 2 s per POST"
    assert row["status"] == "delivered"


async def _received(receiver: Receiver, count: int) -> bool:
    return len(receiver.requests) >= count


async def test_failed_and_cancelled_jobs_are_announced_with_their_error_sentence(
    outbox_db: asyncpg.Pool, database_url: str, tmp_path: Path, receiver: Receiver, secret: str
) -> None:
    config = make_config(tmp_path, webhooks=hooks_block(receiver.url))
    async with running_worker(config, database_url):
        failed = await insert_job(outbox_db, params={"mock_fail": "terminal"})
        cancelled = await insert_job(outbox_db, run_at=_later())
        await outbox_db.execute("UPDATE imagen.jobs SET cancel_requested = true WHERE id = $1", cancelled)
        await settled(outbox_db, failed)
        await settled(outbox_db, cancelled)

    by_job = {r.json["job"]["id"]: r.json for r in receiver.requests}
    failure = by_job[str(failed)]
    assert failure["event"] == "failed" and failure["job"]["status"] == "failed"
    error = await outbox_db.fetchval("SELECT error FROM imagen.jobs WHERE id = $1", failed)
    assert failure["job"]["error"] == error
    assert "mock_fail=terminal" in failure["job"]["error"] and failure["job"]["images"] == []
    cancel = by_job[str(cancelled)]
    assert cancel["event"] == "cancelled"
    assert cancel["job"]["error"] == "cancelled by its owner before it started"


def _later() -> Any:
    from datetime import UTC, datetime, timedelta

    return datetime.now(UTC) + timedelta(hours=1)


async def test_only_the_configured_events_are_queued(
    outbox_db: asyncpg.Pool, database_url: str, tmp_path: Path, receiver: Receiver, secret: str
) -> None:
    config = make_config(tmp_path, webhooks=hooks_block(receiver.url, events=["failed"]))
    async with running_worker(config, database_url):
        done = await insert_job(outbox_db)
        failed = await insert_job(outbox_db, params={"mock_fail": "terminal"})
        await terminal(outbox_db, done)
        await settled(outbox_db, failed)

    assert await delivery_rows(outbox_db, done) == []
    assert [r.json["job"]["id"] for r in receiver.requests] == [str(failed)]


async def test_a_worker_without_webhooks_turns_the_outbox_off(
    outbox_db: asyncpg.Pool, database_url: str, tmp_path: Path, receiver: Receiver, secret: str
) -> None:
    await outbox_db.execute("INSERT INTO imagen.webhook_settings (events) VALUES ('{done}')")
    with capture_logs() as logs:
        async with running_worker(make_config(tmp_path), database_url):
            job_id = await insert_job(outbox_db)
            await terminal(outbox_db, job_id)

    assert await outbox_db.fetchval("SELECT events FROM imagen.webhook_settings") == []
    assert await delivery_rows(outbox_db, job_id) == []
    [warning] = [entry for entry in logs if entry["event"].startswith("webhook events changed")]
    assert (warning["log_level"], warning["previous"], warning["events"]) == ("warning", ["done"], [])


async def test_workers_that_agree_on_webhooks_change_nothing_and_warn_of_nothing(
    outbox_db: asyncpg.Pool, database_url: str, tmp_path: Path, receiver: Receiver, secret: str
) -> None:
    config = make_config(tmp_path, webhooks=hooks_block(receiver.url, events=["done"]))
    with capture_logs() as logs:
        async with running_worker(config, database_url):  # the first one sets it: nothing to warn of
            pass
        async with running_worker(config, database_url):
            pass

    assert await outbox_db.fetchval("SELECT events FROM imagen.webhook_settings") == ["done"]
    assert not [entry for entry in logs if entry["event"].startswith("webhook events changed")]


@pytest.mark.parametrize("value", [None, "short"])
async def test_a_worker_refuses_to_start_without_a_real_secret(
    outbox_db: asyncpg.Pool, database_url: str, tmp_path: Path, receiver: Receiver,
    monkeypatch: pytest.MonkeyPatch, value: str | None,
) -> None:  # fmt: skip
    if value is not None:
        monkeypatch.setenv("HOOK_SIGNING_KEY", value)
    config = make_config(tmp_path, webhooks=hooks_block(receiver.url, secret_env="HOOK_SIGNING_KEY"))
    with pytest.raises(ConfigError, match="HOOK_SIGNING_KEY"):
        await Worker(config, database_url, run_migrations=False).start()
    assert await outbox_db.fetchval("SELECT count(*) FROM imagen.workers") == 0


async def test_rows_nobody_woke_it_for_are_found_by_the_poll(
    outbox_db: asyncpg.Pool, database_url: str, tmp_path: Path, receiver: Receiver, secret: str
) -> None:
    gone, spent = uuid.uuid4(), uuid.uuid4()
    config = make_config(tmp_path, webhooks=hooks_block(receiver.url, max_attempts=4))
    async with running_worker(config, database_url):
        await outbox_db.execute(
            "INSERT INTO imagen.webhook_deliveries (job_id, event, attempts)"
            " VALUES ($1, 'done', 0), ($2, 'failed', 4)",
            gone, spent,
        )  # fmt: skip
        delivered = await settled(outbox_db, gone)
        given_up = await settled(outbox_db, spent)

    # A job deleted before its delivery is still announced, without its details.
    [request] = receiver.requests
    assert request.json == {
        "id": str(delivered["id"]), "event": "done",
        "created_at": delivered["created_at"].isoformat(), "job": None,
    }  # fmt: skip
    assert delivered["status"] == "delivered"
    # A row out of attempts (max_attempts lowered since) is given up without a request.
    assert given_up["status"] == "failed" and given_up["attempts"] == 4
    assert given_up["last_error"] == "no attempts left: webhooks.max_attempts is 4"


async def test_a_clean_stop_lets_the_post_in_flight_finish_instead_of_sending_it_twice(
    outbox_db: asyncpg.Pool, database_url: str, tmp_path: Path, receiver: Receiver, secret: str
) -> None:
    receiver.delay = 1.0
    config = make_config(tmp_path, webhooks=hooks_block(receiver.url))
    async with running_worker(config, database_url):
        job_id = await insert_job(outbox_db)
        await eventually(lambda: _received(receiver, 1))
    # running_worker's exit stopped the worker (SIGTERM's path) while the receiver was answering.

    [row] = await delivery_rows(outbox_db, job_id)
    assert row["status"] == "delivered" and row["attempts"] == 1
    assert len(receiver.requests) == 1
