"""An unavailable or unserved backend holds work instead of failing it, and says why on the rows."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from imagen_worker.backends.base import GenerateRequest, GenerateResult, JobContext
from imagen_worker.backends.mock import MockBackend
from imagen_worker.errors import BackendUnavailable, ConfigError
from imagen_worker.worker.daemon import Worker
from imagen_worker.worker.running import Event
from tests.workers import eventually, insert_job, job_row, make_config, running_worker, terminal

DOWN = "ComfyUI at http://gpu:8188 is unreachable (connection refused)"
# What the job's owner reads: the same sentence without the internal address.
DOWN_PUBLIC = "ComfyUI is unreachable (connection refused)"


class Outage(MockBackend):
    """A backend whose infrastructure fails: each render raises ``BackendUnavailable`` while
    ``failing`` > 0, and the adapter then reports itself unavailable until ``recover()``."""

    failing = 0
    report_down = False
    down: str | None = None

    @property
    def unavailable_reason(self) -> str | None:
        return self.down

    async def generate(self, request: GenerateRequest, ctx: JobContext) -> GenerateResult:
        if self.failing > 0:
            self.failing -= 1
            if self.report_down:
                self.down = DOWN
                self.notify_change()
            raise BackendUnavailable(DOWN)
        return await super().generate(request, ctx)

    def recover(self) -> None:
        self.down = None
        self.notify_change()


def outage(worker: Worker, *, failing: int, report_down: bool) -> Outage:
    backend = Outage.from_config("mock", {"type": "mock"})
    backend.failing, backend.report_down = failing, report_down
    backend.watch(worker.wake.set)
    worker.backends["mock"] = backend
    return backend


def recorded(worker: Worker) -> list[Event]:
    events: list[Event] = []
    worker.hooks.append(lambda event, _data: events.append(event))
    return events


async def _progress(db: asyncpg.Pool, job_id: uuid.UUID) -> Any:
    return (await job_row(db, job_id))["progress"]


async def test_a_backend_outage_holds_the_job_without_spending_an_attempt_and_resumes(
    db: asyncpg.Pool, database_url: str, tmp_path: Path
) -> None:
    config = make_config(tmp_path, worker={"poll_interval": 0.2})
    async with running_worker(config, database_url) as worker:
        backend = outage(worker, failing=1, report_down=True)
        events = recorded(worker)
        job_id = await insert_job(db, "render me after the restart", max_attempts=1)
        waiting = {
            "state": "waiting",
            "reason": "backend_unavailable",
            "backend": "mock",
            "message": DOWN_PUBLIC,
        }
        assert await eventually(lambda: _progress(db, job_id)) == waiting
        held = await job_row(db, job_id)
        await asyncio.sleep(0.5)  # the outage goes on: nothing is claimed meanwhile
        assert (await job_row(db, job_id))["status"] == "pending"
        backend.recover()
        row = await terminal(db, job_id, within=5)

    assert held["status"] == "pending" and held["attempts"] == 0 and held["outage_requeues"] == 1
    assert held["error"] == DOWN_PUBLIC
    assert row["status"] == "done" and row["attempts"] == 1 and row["outage_requeues"] == 1
    assert row["progress"] is None, "the claim cleared the waiting reason (a quick job writes no progress)"
    assert events.count(Event.ENDED) == events.count(Event.CLAIMED) == 2, "each claimed task ends once"
    events = [event for event in events if event is not Event.ENDED]
    assert events[0] == Event.CLAIMED and set(events[1:3]) == {Event.REQUEUED, Event.BACKEND_UNAVAILABLE}
    assert events[3:] == [Event.BACKEND_AVAILABLE, Event.CLAIMED, Event.DONE]


async def test_past_the_outage_cap_an_outage_counts_as_an_ordinary_retryable_failure(
    db: asyncpg.Pool, database_url: str, tmp_path: Path
) -> None:
    config = make_config(tmp_path, worker={"max_outage_requeues": 2, "retry_base_seconds": 0.01})
    async with running_worker(config, database_url) as worker:
        outage(worker, failing=100, report_down=False)  # a job that crashes its backend every time
        job_id = await insert_job(db, "poison", max_attempts=2)
        row = await terminal(db, job_id, within=10)
    assert row["status"] == "failed" and row["outage_requeues"] == 2 and row["attempts"] == 2
    assert row["error"] == f"{DOWN_PUBLIC} (gave up after 2 attempts)"


async def test_a_job_for_a_backend_no_worker_serves_waits_and_says_why(
    db: asyncpg.Pool, database_url: str, tmp_path: Path
) -> None:
    config = make_config(tmp_path, worker={"poll_interval": 0.2})
    async with running_worker(config, database_url):
        job_id = await insert_job(db, "for the big GPU", backend="big-gpu")
        progress = await eventually(lambda: _progress(db, job_id))
        await asyncio.sleep(0.5)
        row = await job_row(db, job_id)
    assert progress == {
        "state": "waiting", "reason": "no_worker", "backend": "big-gpu",
        "message": "no worker serves backend 'big-gpu' yet",
    }  # fmt: skip
    assert row["status"] == "pending" and row["attempts"] == 0, "not failed before worker.orphan_after"


async def test_after_orphan_after_a_job_nobody_serves_fails_in_words(
    db: asyncpg.Pool, database_url: str, tmp_path: Path
) -> None:
    config = make_config(tmp_path, worker={"poll_interval": 0.2, "orphan_after": 1})
    async with running_worker(config, database_url):
        job_id = await insert_job(db, "for a typo", backend="mokc")
        row = await terminal(db, job_id, within=10)
    assert row["status"] == "failed"
    assert row["error"] == "unknown backend 'mokc': no worker serves it", "no word of what is served"
    assert row["error_detail"]["served"] == ["mock"], "the operator's record says"
    assert (row["finished_at"] - row["created_at"]).total_seconds() >= 1


async def test_a_worker_refuses_to_start_when_it_does_not_serve_its_default_backend(
    db: asyncpg.Pool, database_url: str, tmp_path: Path
) -> None:
    config = make_config(
        tmp_path,
        backends={"mock": {"type": "mock"}, "slow": {"type": "mock", "latency_ms": 300}},
        worker={"backends": ["slow"]},
        default_backend="mock",
    )
    with pytest.raises(ConfigError) as refused:
        async with running_worker(config, database_url):
            pass
    assert str(refused.value) == (
        "default_backend: 'mock' is not served by this worker (it serves slow); "
        "set default_backend to one of them"
    )
    assert await db.fetchval("SELECT count(*) FROM imagen.workers") == 0, "refused before registering"


async def test_workers_record_their_default_backend_in_the_registry(
    db: asyncpg.Pool, database_url: str, tmp_path: Path
) -> None:
    config = make_config(
        tmp_path, backends={"mock": {"type": "mock"}, "slow": {"type": "mock"}}, default_backend="slow"
    )
    async with running_worker(config, database_url) as worker:
        row = await db.fetchrow("SELECT * FROM imagen.workers WHERE id = $1", worker.id)
        assert row["default_backend"] == "slow" and row["backends"] == ["mock", "slow"]
        assert row["stopped_at"] is None
    row = await db.fetchrow("SELECT * FROM imagen.workers WHERE id = $1", worker.id)
    assert row["stopped_at"] is not None, "a clean stop keeps the entry, marked stopped"
