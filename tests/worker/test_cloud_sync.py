"""Cloud sync through the worker: nothing lost when storage or the database blips."""

from __future__ import annotations

import asyncio
import subprocess
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import asyncpg
import httpx

from imagen_worker.config import Config
from imagen_worker.storage import outage
from imagen_worker.worker import fleet
from imagen_worker.worker.running import Event
from tests.fakes.storage import FakeStorage
from tests.workers import (
    BIN,
    eventually,
    image_row,
    insert_job,
    job_row,
    make_config,
    running_worker,
    terminal,
    waiting_for_storage,
    worker_env,
    write_config,
)

OWNER = uuid.UUID("00000000-0000-4000-8000-000000000005")
STORAGE = {"type": "supabase", "max_retries": 0}


async def insert(db: asyncpg.Pool, prompt: str) -> uuid.UUID:
    return await insert_job(db, prompt, owner_user_id=OWNER, width=128, height=128)


@asynccontextmanager
async def storage_refused(
    config: Config, database_url: str, storage: FakeStorage
) -> AsyncIterator[list[Event]]:
    """A running worker whose Storage refuses connections; yields the events it emits."""
    events: list[Event] = []
    async with running_worker(config, database_url) as worker:
        worker.hooks.append(lambda event, _data: events.append(event))
        await storage.go_down()
        yield events


async def test_a_done_job_has_its_image_in_storage_and_a_signed_url_serves_it(
    db: asyncpg.Pool, database_url: str, tmp_path: Path, storage: FakeStorage
) -> None:
    config = make_config(tmp_path, storage=STORAGE)
    async with running_worker(config, database_url):
        job = await terminal(db, await insert(db, "a kite over dunes"))
    assert job["status"] == "done", job["error"]
    image = await image_row(db, job["image_id"])
    stored = storage.get(image["storage_path"])
    local = Path(image["local_path"]).read_bytes()
    assert stored is not None and stored.data == local and stored.content_type == "image/png"

    signed = await asyncio.to_thread(
        subprocess.run,
        [str(BIN / "imagen"), "sign", str(image["id"]), "--ttl", "60"],
        env={**worker_env(database_url, write_config(tmp_path, storage=STORAGE)),
             "SUPABASE_URL": storage.url, "SUPABASE_SERVICE_KEY": storage.service_key},
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert signed.returncode == 0, signed.stderr
    url = signed.stdout.strip()
    assert url.startswith(f"{storage.url}/storage/v1/object/sign/")
    async with httpx.AsyncClient() as client:
        assert (await client.get(url)).content == local


async def test_a_storage_whose_disk_is_full_keeps_the_job_waiting_with_its_image_until_it_takes_it(
    db: asyncpg.Pool, database_url: str, tmp_path: Path, storage: FakeStorage
) -> None:
    # Storage answers, but its own disk is full: an upload answers 500 "ENOSPC", then room again.
    storage.fail_next(1, status="disk_full", methods=["PUT"])
    config = make_config(tmp_path, storage=STORAGE)
    async with running_worker(config, database_url):
        job_id = await insert(db, "a glass whale")
        waiting = await eventually(lambda: waiting_for_storage(db, job_id))
        job = await terminal(db, job_id, within=15)
    assert (waiting["status"], waiting["attempts"]) == ("running", 1)
    assert job["status"] == "done" and job["attempts"] == 1, "no attempt spent, the image never discarded"
    image = await db.fetchrow("SELECT * FROM imagen.images WHERE job_id = $1", job["id"])
    put_statuses = [r.status for r in storage.requests if r.method == "PUT"]
    assert put_statuses == [500, 200, 200], "the image (refused, then stored), then its thumbnail"
    assert storage.object_count() == 2 and storage.put_count(image["storage_path"]) == 1
    assert storage.put_count(image["thumbnail_path"]) == 1
    assert len(list((tmp_path / "images").glob("*.png"))) == 1, "the image was generated once"


async def test_a_storage_outage_longer_than_the_attempts_keeps_the_job_and_uploads_once_storage_is_back(
    db: asyncpg.Pool, database_url: str, tmp_path: Path, storage: FakeStorage
) -> None:
    async with storage_refused(make_config(tmp_path, storage=STORAGE), database_url, storage) as events:
        job_id = await insert(db, "a lantern in the snow")
        await eventually(lambda: waiting_for_storage(db, job_id))
        # With retry_base_seconds 0.05 the job's three attempts would long be spent and failed.
        await asyncio.sleep(1.0)
        row = await job_row(db, job_id)
        assert row["status"] == "running" and row["attempts"] == 1 and row["error"] is None
        assert row["progress"]["message"] == outage.WAITING_MESSAGE
        assert len(list((tmp_path / "images").glob("*.png"))) == 1, "the image waits on local disk"

        await storage.come_back()
        job = await terminal(db, job_id, within=20)
    assert job["status"] == "done" and job["attempts"] == 1, job["error"]
    image = await image_row(db, job["image_id"])
    assert storage.put_count(image["storage_path"]) == 1 and storage.put_count(image["thumbnail_path"]) == 1
    assert job["progress"]["stage"] == "storage_back"
    assert events == [Event.CLAIMED, Event.STORAGE_WAITING, Event.DONE, Event.ENDED], "one wait, counted once"


async def test_while_every_slot_waits_for_storage_the_queued_jobs_say_so_and_start_once_it_is_back(
    db: asyncpg.Pool, database_url: str, tmp_path: Path, storage: FakeStorage
) -> None:
    config = make_config(tmp_path, storage=STORAGE, worker={"concurrency": 1})
    async with storage_refused(config, database_url, storage) as events:
        first = await insert(db, "rendered, then Storage went away")
        await eventually(lambda: waiting_for_storage(db, first))
        second = await insert(db, "queued behind it")

        async def says_why() -> asyncpg.Record | None:
            row = await job_row(db, second)
            return row if row["progress"] and row["progress"].get("state") == "waiting" else None

        queued = await eventually(says_why, within=10)
        await storage.come_back()
        done = [await terminal(db, job, within=20) for job in (first, second)]

    assert queued["status"] == "pending" and queued["progress"] == {
        "state": "waiting", "reason": "backend_unavailable", "backend": "mock", "message": fleet.STORAGE_HELD,
    }  # fmt: skip
    assert [(row["status"], row["attempts"]) for row in done] == [("done", 1), ("done", 1)]
    assert done[1]["progress"] is None or done[1]["progress"].get("state") != "waiting"
    assert events.count(Event.BACKEND_UNAVAILABLE) == 1 and events.count(Event.BACKEND_AVAILABLE) == 1


async def test_a_worker_stopped_during_a_storage_outage_hands_the_job_back_and_its_image_is_reused(
    db: asyncpg.Pool, database_url: str, tmp_path: Path, storage: FakeStorage
) -> None:
    storage.fail_next(100_000, status=503)
    config = make_config(tmp_path, storage=STORAGE, worker={"shutdown_grace": 0.2})
    async with running_worker(config, database_url):
        job_id = await insert(db, "a heron at dusk")
        await eventually(lambda: waiting_for_storage(db, job_id))
    released = await job_row(db, job_id)
    assert released["status"] == "pending", "handed back at shutdown, not failed and not left running"
    [image_path] = (tmp_path / "images").glob("*.png")
    first_render = image_path.stat().st_ino

    storage.recover()
    async with running_worker(config, database_url):
        job = await terminal(db, job_id, within=20)
    assert job["status"] == "done", job["error"]
    assert image_path.stat().st_ino == first_render, (
        "the next attempt uploaded the same file, not a new render"
    )
    image = await image_row(db, job["image_id"])
    blob = storage.get(image["storage_path"])
    assert blob is not None and blob.data == image_path.read_bytes()


async def test_upload_landed_but_the_database_transaction_failed_yields_one_object_and_one_row(
    db: asyncpg.Pool, database_url: str, tmp_path: Path, storage: FakeStorage
) -> None:
    await db.execute(
        """
        CREATE SEQUENCE public.image_inserts;  -- sequences survive the rollback
        CREATE FUNCTION public.fail_once() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            IF nextval('public.image_inserts') = 1 THEN
                RAISE EXCEPTION 'simulated database failure after the upload';
            END IF;
            RETURN NEW;
        END $$;
        CREATE TRIGGER fail_once BEFORE INSERT ON imagen.images
            FOR EACH ROW EXECUTE FUNCTION public.fail_once();
        """
    )
    try:
        config = make_config(tmp_path, storage=STORAGE)
        async with running_worker(config, database_url):
            job = await terminal(db, await insert(db, "a moth at a lamp"), within=15)
    finally:
        await db.execute(
            "DROP TRIGGER fail_once ON imagen.images; DROP FUNCTION public.fail_once(); "
            "DROP SEQUENCE public.image_inserts;"
        )
    assert job["status"] == "done" and job["attempts"] == 2
    rows = await db.fetch("SELECT storage_path FROM imagen.images WHERE job_id = $1", job["id"])
    assert len(rows) == 1
    assert storage.object_count() == 2, "the retry overwrote its own objects (the image, its thumbnail)"
    assert storage.put_count(rows[0]["storage_path"]) == 1, "the retry linked the recorded upload"


async def test_generate_reports_a_failed_sync_on_stderr_and_still_exits_0(
    tmp_path: Path, storage: FakeStorage
) -> None:
    storage.fail_next(100, status=503)
    config = write_config(tmp_path, storage=STORAGE)
    env = {**worker_env("", config), "SUPABASE_URL": storage.url, "SUPABASE_SERVICE_KEY": storage.service_key}
    result = await asyncio.to_thread(
        subprocess.run, [str(BIN / "imagen"), "generate", "a snail", "--size", "64x64"],
        env=env, capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert result.returncode == 0
    assert "imagen: cloud sync:" in result.stderr and "503" in result.stderr
    assert Path(result.stdout.strip()).is_file(), "the image exists although the upload failed"

    skipped = await asyncio.to_thread(
        subprocess.run, [str(BIN / "imagen"), "generate", "a snail", "--size", "64x64", "--no-cloud"],
        env=env, capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert skipped.returncode == 0 and "cloud sync" not in skipped.stderr
