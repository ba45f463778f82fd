"""Where a finished job's image is: `imagen status` and `imagen open`, local and in the cloud.

With local storage nothing is uploaded, so the image row names the local file and `status`
says "not uploaded"; with cloud storage `status --sign` prints a working signed URL and
`open` downloads the object when the local copy is gone.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import uuid
from pathlib import Path

import asyncpg
import httpx

from tests.fakes.storage import FakeStorage
from tests.workers import BIN, insert_job, make_config, running_worker, terminal, worker_env, write_config

OWNER = uuid.UUID("00000000-0000-4000-8000-000000000007")


def imagen(*args: str, dsn: str, config: Path, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "imagen"), *args], env={**worker_env(dsn, config), **env}, capture_output=True,
        text=True, timeout=60, check=False,
    )  # fmt: skip


def fields(stdout: str) -> dict[str, str]:
    rows = [line.strip().split(None, 1) for line in stdout.splitlines() if line.strip()]
    return {row[0]: row[1] if len(row) > 1 else "" for row in rows}


# The worker's local path is a host internal: the operator reads it from image_internals.
LOCAL_PATH = "SELECT local_path FROM imagen.image_internals WHERE image_id = $1"


async def test_with_local_storage_status_and_open_name_the_local_file(
    db: asyncpg.Pool, database_url: str, tmp_path: Path
) -> None:
    config_path = write_config(tmp_path)
    async with running_worker(make_config(tmp_path), database_url):
        job = await terminal(db, await insert_job(db, "a tin robot", owner_user_id=OWNER))
    local = Path(await db.fetchval(LOCAL_PATH, job["image_id"]))

    status = await asyncio.to_thread(
        imagen, "status", str(job["id"]), "--sign", dsn=database_url, config=config_path
    )
    opened = await asyncio.to_thread(imagen, "open", str(job["id"]), dsn=database_url, config=config_path)

    assert status.returncode == 0, status.stderr
    shown = fields(status.stdout)
    assert shown["local_path"] == str(local)
    assert shown["storage_key"] == "not uploaded (local storage)"
    assert "nothing to sign" in status.stderr
    assert (opened.returncode, opened.stdout) == (0, f"{local}\n")


async def test_with_cloud_storage_status_signs_and_open_downloads_a_missing_local_copy(
    db: asyncpg.Pool, database_url: str, tmp_path: Path, storage: FakeStorage
) -> None:
    cloud = {"type": "supabase", "max_retries": 0}
    config_path = write_config(tmp_path, storage=cloud)
    async with running_worker(make_config(tmp_path, storage=cloud), database_url):
        job = await terminal(db, await insert_job(db, "a paper crane", owner_user_id=OWNER))
    assert job["status"] == "done", job["error"]
    image = await db.fetchrow("SELECT * FROM imagen.images WHERE id = $1", job["image_id"])
    local = Path(await db.fetchval(LOCAL_PATH, job["image_id"]))
    original = local.read_bytes()

    status = await asyncio.to_thread(
        imagen, "status", str(job["id"]), "--sign", dsn=database_url, config=config_path
    )
    assert status.returncode == 0, status.stderr
    shown = fields(status.stdout)
    assert shown["storage_key"] == image["storage_path"]
    async with httpx.AsyncClient() as client:
        assert (await client.get(shown["signed_url"])).content == original

    local.unlink()
    into = tmp_path / "downloads"
    opened = await asyncio.to_thread(
        imagen, "open", str(job["image_id"]), "--into", str(into), dsn=database_url, config=config_path
    )
    assert opened.returncode == 0, opened.stderr
    downloaded = Path(opened.stdout.strip())
    assert downloaded.parent == into and downloaded.read_bytes() == original


async def test_status_of_a_waiting_job_shows_why_it_waits(
    db: asyncpg.Pool, database_url: str, tmp_path: Path
) -> None:
    why = "no worker serving backend 'gpu' has been seen for 2 minutes"
    job_id = await insert_job(db, "a patient owl", owner_user_id=OWNER, backend="gpu")
    await db.execute(
        "UPDATE imagen.jobs SET progress = jsonb_build_object('message', $2::text) WHERE id = $1", job_id, why
    )

    status = await asyncio.to_thread(
        imagen, "status", str(job_id), dsn=database_url, config=write_config(tmp_path)
    )

    assert status.returncode == 0, status.stderr
    assert fields(status.stdout)["waiting"] == why
    assert json.loads(fields(status.stdout)["progress"]) == {"message": why}, "JSON, as stored"


async def test_open_of_a_job_without_an_image_says_so(
    db: asyncpg.Pool, database_url: str, tmp_path: Path
) -> None:
    job_id = await insert_job(db, "not yet", owner_user_id=OWNER)

    opened = await asyncio.to_thread(
        imagen, "open", str(job_id), dsn=database_url, config=write_config(tmp_path)
    )

    assert opened.returncode == 1, "the command's own no, like status of an unknown job"
    assert opened.stderr == f"imagen: job {job_id} is pending: it has no image yet\n"
    unknown = uuid.uuid4()
    missing = await asyncio.to_thread(
        imagen, "open", str(unknown), dsn=database_url, config=write_config(tmp_path)
    )
    assert (missing.returncode, missing.stderr) == (1, f"imagen: no job or image {unknown}\n")
