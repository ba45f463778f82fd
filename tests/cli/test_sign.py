"""``imagen sign`` takes an image id, a job id or a storage path."""

from __future__ import annotations

import asyncio
import subprocess
import uuid
from pathlib import Path

import asyncpg
import httpx

from imagen_worker.cli.failures import Code
from tests.fakes.storage import FakeStorage
from tests.workers import BIN, insert_job, make_config, running_worker, terminal, worker_env, write_config

OWNER = uuid.UUID("00000000-0000-4000-8000-0000000000d7")
STORAGE = {"type": "supabase", "max_retries": 0}


async def sign(
    database_url: str, tmp_path: Path, storage: FakeStorage, reference: str
) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(
        subprocess.run,
        [str(BIN / "imagen"), "sign", reference, "--ttl", "60"],
        env={**worker_env(database_url, write_config(tmp_path, storage=STORAGE)),
             "SUPABASE_URL": storage.url, "SUPABASE_SERVICE_KEY": storage.service_key},
        capture_output=True, text=True, check=False,
    )  # fmt: skip


async def test_a_job_id_signs_the_jobs_image(
    db: asyncpg.Pool, database_url: str, tmp_path: Path, storage: FakeStorage
) -> None:
    async with running_worker(make_config(tmp_path, storage=STORAGE), database_url):
        job = await terminal(
            db, await insert_job(db, "a paper boat", owner_user_id=OWNER, width=64, height=64)
        )
    assert job["status"] == "done", job["error"]

    by_job = await sign(database_url, tmp_path, storage, str(job["id"]))
    by_image = await sign(database_url, tmp_path, storage, str(job["image_id"]))

    assert by_job.returncode == 0 and by_image.returncode == 0, by_job.stderr + by_image.stderr
    stored = storage.get(f"{OWNER}/{job['id']}.png")
    assert stored is not None
    async with httpx.AsyncClient() as client:
        assert (await client.get(by_job.stdout.strip())).content == stored.data
        assert (await client.get(by_image.stdout.strip())).content == stored.data


async def test_a_job_without_an_image_or_an_unknown_id_is_refused_in_words(
    db: asyncpg.Pool, database_url: str, tmp_path: Path, storage: FakeStorage
) -> None:
    pending = await insert_job(db, "not yet", owner_user_id=OWNER)
    unknown = uuid.uuid4()

    waiting = await sign(database_url, tmp_path, storage, str(pending))
    missing = await sign(database_url, tmp_path, storage, str(unknown))

    assert waiting.returncode == missing.returncode == Code.FAILED
    assert waiting.stderr == f"imagen: job {pending} is pending: it has no image yet\n"
    assert missing.stderr == f"imagen: no image or job {unknown}\n"
