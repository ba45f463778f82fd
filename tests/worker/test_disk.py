"""A worker whose output disk cannot take a job's files claims nothing, and no job pays for it.

The gate's own rules against this machine's real filesystem, then a real worker and a real
PostgreSQL meeting a directory that cannot be written (a regular file where the output
directory's parent should be: every write fails with ENOTDIR, as a full disk fails with
ENOSPC; `tests/faults/test_full_disk.py` fills a real filesystem).
"""

from __future__ import annotations

import asyncio
import errno
from pathlib import Path

import asyncpg
import pytest

from imagen_worker.backends.base import GenerateRequest, GenerateResult, JobContext
from imagen_worker.backends.mock import MockBackend
from imagen_worker.worker.disk import HELD, MIB, OutputDisk, free_bytes, probe
from imagen_worker.worker.running import Event
from tests.workers import eventually, insert_job, job_row, make_config, running_worker, terminal

WAITING = {"state": "waiting", "reason": "backend_unavailable", "backend": "mock", "message": HELD}


async def test_a_disk_with_room_holds_nothing(tmp_path: Path) -> None:
    disk = OutputDisk(tmp_path / "images", min_free_bytes=1 * MIB)
    assert await disk.check() is None and disk.reason is None


async def test_less_free_space_than_the_floor_holds_claims_until_there_is_room(tmp_path: Path) -> None:
    free = free_bytes(tmp_path)
    disk = OutputDisk(tmp_path, min_free_bytes=free + 1024 * MIB, recheck_seconds=0)
    assert await disk.check() == HELD
    disk.min_free_bytes = max(free - 1024 * MIB, 0)  # as if a gigabyte had been freed
    assert await disk.check() is None


async def test_a_failed_write_holds_claims_at_once_until_a_probe_file_is_written(tmp_path: Path) -> None:
    disk = OutputDisk(tmp_path / "images", min_free_bytes=0, recheck_seconds=0.2)
    disk.failed("No space left on device")
    assert disk.reason == HELD
    assert await disk.check() == HELD, "no probe sooner than recheck_seconds after the failure"
    await asyncio.sleep(0.25)
    assert await disk.check() is None
    assert list((tmp_path / "images").iterdir()) == [], "the probe file is removed"


async def test_a_probe_that_cannot_write_keeps_claims_held(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("a file where the output directory's parent should be")
    disk = OutputDisk(blocker / "images", min_free_bytes=0, recheck_seconds=0)
    disk.failed("Not a directory")
    assert await disk.check() == HELD
    assert probe(blocker / "images") == "Not a directory"
    blocker.unlink()
    assert await disk.check() is None


def test_free_space_of_a_directory_not_created_yet_is_its_filesystems(tmp_path: Path) -> None:
    assert abs(free_bytes(tmp_path / "a" / "b") - free_bytes(tmp_path)) < 64 * MIB


async def test_a_worker_that_cannot_write_gives_the_job_back_and_claims_nothing_until_it_can(
    db: asyncpg.Pool, database_url: str, tmp_path: Path
) -> None:
    blocker = tmp_path / "disk"
    blocker.write_text("a file where the output directory's parent should be")
    config = make_config(
        tmp_path,
        worker={"poll_interval": 0.2},
        output={"directory": str(blocker / "images")},
    )
    async with running_worker(config, database_url) as worker:
        events: list[Event] = []
        worker.hooks.append(lambda event, _data: events.append(event))
        first = await insert_job(db, "rendered, then nowhere to put it", max_attempts=1)

        async def held() -> asyncpg.Record | None:
            row = await job_row(db, first)
            return row if row["progress"] == WAITING else None

        given_back = await eventually(held)
        second = await insert_job(db, "queued behind a full disk", max_attempts=1)
        await asyncio.sleep(1.0)  # the disk stays unwritable: nothing is claimed meanwhile
        still = [await job_row(db, job) for job in (first, second)]
        blocker.unlink()  # room again
        done = [await terminal(db, job, within=10) for job in (first, second)]

    assert given_back["status"] == "pending" and given_back["attempts"] == 0
    assert given_back["outage_requeues"] == 1
    assert given_back["error"] == "could not write the image to the output directory (Not a directory)"
    assert [(row["status"], row["attempts"], row["outage_requeues"]) for row in still] == [
        ("pending", 0, 1),
        ("pending", 0, 0),
    ]
    assert [row["progress"] for row in still] == [WAITING, WAITING], "both say why they wait"
    assert [(row["status"], row["attempts"]) for row in done] == [("done", 1), ("done", 1)]
    assert events.count(Event.CLAIMED) == 3 and events.count(Event.REQUEUED) == 1
    assert (blocker / "images").is_dir()


async def test_a_backend_file_that_meets_a_full_disk_gives_the_job_back_in_words(
    db: asyncpg.Pool, database_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A large download a backend spools to the temporary directory: the OSError it raises is
    this host's disk, not the database the same exception type also covers."""

    async def spool_full(self: MockBackend, request: GenerateRequest, ctx: JobContext) -> GenerateResult:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(MockBackend, "generate", spool_full)
    config = make_config(tmp_path, worker={"poll_interval": 0.2, "max_outage_requeues": 1})
    async with running_worker(config, database_url) as worker:
        job_id = await insert_job(db, "a spooled fox", max_attempts=1)

        async def given_back() -> asyncpg.Record | None:
            row = await job_row(db, job_id)
            return row if row["outage_requeues"] == 1 else None

        row = await eventually(given_back)
        held = worker.fleet.disk.reason

    assert (row["status"], row["attempts"]) == ("pending", 0)
    assert row["error"] == "could not keep the job's files on this host (No space left on device)"
    assert held == HELD
