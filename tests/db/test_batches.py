"""Migration 0010: a web user asks for n images in a format; each image is its own row."""

from __future__ import annotations

import uuid

import asyncpg
import pytest

from imagen_worker.queue.jobs import ImageRecord, Queue
from tests.db.test_rls import ALICE, add_job, request_as


@pytest.mark.parametrize(
    ("column", "value"), [("n", 0), ("n", 17), ("format", "gif"), ("quality", 0), ("quality", 101)]
)
async def test_out_of_range_batch_and_format_columns_are_refused_at_insert(
    db: asyncpg.Pool, column: str, value: object
) -> None:
    with pytest.raises(asyncpg.CheckViolationError):
        await add_job(db, ALICE, **{column: value})


async def test_authenticated_may_write_n_format_and_quality(db: asyncpg.Pool) -> None:
    async with request_as(db, "authenticated", ALICE) as conn:
        row = await conn.fetchrow(
            "INSERT INTO imagen.jobs (owner_user_id, prompt, n, format, quality) "
            "VALUES ($1, 'four cats', 4, 'webp', 80) RETURNING n, format, quality",
            ALICE,
        )
    assert tuple(row) == (4, "webp", 80)
    assert await db.fetchval("SELECT n FROM imagen.jobs WHERE prompt = 'a job of ' || $1", str(ALICE)) is None


def record(job_id: uuid.UUID, index: int) -> ImageRecord:
    return ImageRecord(
        storage_path=f"{ALICE}/{job_id}-{index}.webp", mime_type="image/webp", bytes=3, sha256="b" * 64,
        backend="mock", seed=1, latency_ms=5, sidecar={}, index=index,
        thumbnail_path=f"{ALICE}/{job_id}/{index}.thumb.webp",
    )  # fmt: skip


async def test_a_batch_completes_as_one_row_per_index_and_the_job_links_index_0(db: asyncpg.Pool) -> None:
    job_id = await add_job(db, ALICE, n=3)
    queue = Queue(db, uuid.uuid4())
    (job,) = await queue.claim("mock", is_default=True, limit=1, lease_seconds=30)
    batch = [record(job_id, i) for i in range(3)]
    await queue.record_upload(job, batch)
    image_id = await queue.complete(job, batch)

    rows = await db.fetch(
        "SELECT id, index, thumbnail_path FROM imagen.images WHERE job_id = $1 ORDER BY index", job_id
    )
    assert [row["index"] for row in rows] == [0, 1, 2]
    assert (
        rows[0]["id"]
        == image_id
        == await db.fetchval("SELECT image_id FROM imagen.jobs WHERE id = $1", job_id)
    )
    assert rows[2]["thumbnail_path"] == f"{ALICE}/{job_id}/2.thumb.webp"
    with pytest.raises(asyncpg.UniqueViolationError) as caught:
        await db.execute(
            "INSERT INTO imagen.images (owner_user_id, job_id, prompt, prompt_hash, backend, storage_path,"
            " mime_type, bytes, sha256, index) VALUES ($1, $2, 'p', 'h', 'mock', 'x/y.png', 'image/png', 1,"
            " $3, 1)",
            ALICE, job_id, "c" * 64,
        )  # fmt: skip
    assert caught.value.constraint_name == "images_job_index_key"
