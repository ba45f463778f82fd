"""A job asking for n images gets n images rows, each uploaded with its thumbnail."""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from xml.etree import ElementTree

import asyncpg
from PIL import Image

from imagen_worker.output import thumbnail_path
from tests.workers import insert_job, make_config, running_worker, terminal

OWNER = uuid.UUID("00000000-0000-4000-8000-000000000010")


async def test_a_web_insert_of_n_4_webp_gives_four_rows_with_thumbnails_and_the_first_linked(
    db: asyncpg.Pool, database_url: str, tmp_path: Path
) -> None:
    config = make_config(tmp_path)
    async with running_worker(config, database_url):
        job_id = await insert_job(
            db, "four herons", owner_user_id=OWNER, n=4, format="webp", quality=70, width=96, height=64
        )
        job = await terminal(db, job_id, within=5.0)

    assert job["status"] == "done", job["error"]
    rows = await db.fetch(
        "SELECT i.*, n.local_path FROM imagen.images i JOIN imagen.image_internals n ON n.image_id = i.id "
        "WHERE i.job_id = $1 ORDER BY i.index",
        job_id,
    )
    assert [row["index"] for row in rows] == [0, 1, 2, 3]
    assert job["image_id"] == rows[0]["id"], "jobs.image_id is the first image"
    assert [row["storage_path"] for row in rows] == [
        f"local:{OWNER}/{job_id}.webp",
        *(f"local:{OWNER}/{job_id}-{i}.webp" for i in (1, 2, 3)),
    ]
    assert [row["thumbnail_path"] for row in rows] == [
        f"local:{OWNER}/{job_id}/{i}.thumb.webp" for i in range(4)
    ]
    assert len({row["sha256"] for row in rows}) == 4, "each image of the batch is its own"
    for row in rows:
        local = Path(row["local_path"])
        with Image.open(local) as image:
            assert (image.format, image.size) == ("WEBP", (96, 64))
            packet = ElementTree.fromstring(image.info["xmp"])
        embedded = json.loads(next(e.text for e in packet.iter() if e.tag.endswith("}metadata") and e.text))[
            "imagen"
        ]
        assert (embedded["index"], embedded["batch_size"]) == (row["index"], 4), "which image of the batch"
        assert row["sidecar"]["created_at"].endswith("+00:00"), "UTC, not the worker's time zone"
        assert row["mime_type"] == "image/webp" and row["bytes"] == local.stat().st_size
        with Image.open(thumbnail_path(local)) as thumb:
            assert thumb.format == "WEBP" and max(thumb.size) <= 256


async def test_n_over_the_backends_max_batch_fails_in_one_sentence(
    db: asyncpg.Pool, database_url: str, tmp_path: Path
) -> None:
    config = make_config(tmp_path, backends={"mock": {"type": "mock", "max_batch": 2}})
    async with running_worker(config, database_url):
        job_id = await insert_job(db, "too many", owner_user_id=OWNER, n=3)
        job = await terminal(db, job_id, within=5.0)
    assert job["status"] == "failed"
    assert job["error"] == 'n 3 is over backend "mock"\'s limit of 2 images per job (max_batch)'
    assert await db.fetchval("SELECT count(*) FROM imagen.images WHERE job_id = $1", job_id) == 0
