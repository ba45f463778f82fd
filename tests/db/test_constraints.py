"""The database itself refuses malformed jobs and images, whoever inserts them."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest

OWNER = uuid.UUID("00000000-0000-4000-8000-0000000000a1")
SHA256 = "ab" * 32


async def insert(pool: asyncpg.Pool, table: str, row: dict[str, Any]) -> asyncpg.Record:
    columns = ", ".join(row)
    values = ", ".join(f"${i}" for i in range(1, len(row) + 1))
    record = await pool.fetchrow(
        f"INSERT INTO imagen.{table} ({columns}) VALUES ({values}) RETURNING *", *row.values()
    )
    assert record is not None
    return record


def nested(levels: int) -> Any:
    """A JSON value ``levels`` deep: lists around a number."""
    value: Any = 1
    for _ in range(levels - 1):
        value = [value]
    return value


def job(**overrides: Any) -> dict[str, Any]:
    return {"owner_user_id": OWNER, "prompt": "a lighthouse at dusk", **overrides}


def image(**overrides: Any) -> dict[str, Any]:
    return {
        "owner_user_id": OWNER,
        "prompt": "a lighthouse at dusk",
        "prompt_hash": "h",
        "backend": "mock",
        "storage_path": f"2026-01-01/{uuid.uuid4().hex}.png",
        "mime_type": "image/png",
        "bytes": 10,
        "sha256": SHA256,
        **overrides,
    }


BAD_JOBS = [
    pytest.param({"prompt": ""}, "jobs_prompt_not_blank", id="empty prompt"),
    pytest.param({"prompt": "   "}, "jobs_prompt_not_blank", id="spaces-only prompt"),
    pytest.param({"prompt": " \t\r\n\f "}, "jobs_prompt_not_blank", id="ascii-whitespace-only prompt"),
    pytest.param({"prompt": "\u00a0\u3000\u2009"}, "jobs_prompt_not_blank", id="unicode-space-only prompt"),
    pytest.param({"prompt": "x" * 10_000_000}, "jobs_prompt_length", id="10 MB prompt"),
    pytest.param({"prompt": "x" * 8001}, "jobs_prompt_length", id="prompt of 8001 chars"),
    pytest.param({"negative_prompt": "x" * 8001}, "jobs_negative_prompt_length", id="long negative prompt"),
    pytest.param({"width": 0}, "jobs_width_valid", id="width 0"),
    pytest.param({"width": 4097}, "jobs_width_valid", id="width 4097"),
    pytest.param({"width": 513}, "jobs_width_valid", id="width 513 (not a multiple of 8)"),
    pytest.param({"height": 63}, "jobs_height_valid", id="height 63"),
    pytest.param({"height": 4104}, "jobs_height_valid", id="height 4104"),
    pytest.param({"steps": 0}, "jobs_steps_valid", id="steps 0"),
    pytest.param({"steps": 10_000}, "jobs_steps_valid", id="steps 10000"),
    pytest.param({"params": []}, "jobs_params_object", id="params []"),
    pytest.param({"params": "x"}, "jobs_params_object", id='params "x"'),
    pytest.param({"params": {"blob": "x" * 70_000}}, "jobs_params_size", id="params over 64 kB"),
    pytest.param({"params": {"a": nested(32)}}, "jobs_params_plain", id="params 33 levels deep"),
    pytest.param({"params": {"a": [1, {"b": 1e300}]}}, "jobs_params_plain", id="a number of 1e300 in params"),
    pytest.param({"params": {"a": -(10**64)}}, "jobs_params_plain", id="a number of -1e64 in params"),
    pytest.param({"status": "hacked"}, "jobs_status_valid", id="status hacked"),
    pytest.param({"status": "running"}, "jobs_running_has_lease", id="running without a lease"),
    pytest.param({"status": "done"}, "jobs_done_has_image", id="done without an image"),
    pytest.param({"seed": -1}, "jobs_seed_valid", id="negative seed"),
    pytest.param({"seed": 2**53}, "jobs_seed_valid", id="seed beyond 2^53-1"),
    pytest.param({"priority": 1000}, "jobs_priority_range", id="priority 1000"),
    pytest.param({"priority": -101}, "jobs_priority_range", id="priority -101"),
    pytest.param({"attempts": -1}, "jobs_attempts_valid", id="negative attempts"),
    pytest.param({"max_attempts": 0}, "jobs_max_attempts_valid", id="max_attempts 0"),
    pytest.param({"max_attempts": 51}, "jobs_max_attempts_valid", id="max_attempts 51"),
    pytest.param({"dedupe_key": ""}, "jobs_dedupe_key_length", id="empty dedupe_key"),
    pytest.param({"dedupe_key": "k" * 201}, "jobs_dedupe_key_length", id="dedupe_key of 201 chars"),
    pytest.param({"backend": ""}, "jobs_backend_name", id="empty backend name"),
    pytest.param({"style": "s" * 65}, "jobs_style_name", id="style name of 65 chars"),
]


@pytest.mark.parametrize(("overrides", "constraint"), BAD_JOBS)
async def test_a_malformed_job_is_rejected_by_its_named_check_constraint(
    db: asyncpg.Pool, overrides: dict[str, Any], constraint: str
) -> None:
    with pytest.raises(asyncpg.CheckViolationError) as caught:
        await insert(db, "jobs", job(**overrides))

    assert caught.value.constraint_name == constraint


@pytest.mark.parametrize("column", ["owner_user_id", "prompt", "status", "params", "width", "run_at"])
async def test_a_job_with_a_null_required_column_is_rejected_naming_the_column(
    db: asyncpg.Pool, column: str
) -> None:
    with pytest.raises(asyncpg.NotNullViolationError, match=f'column "{column}"'):
        await insert(db, "jobs", job(**{column: None}))


async def test_a_minimal_job_is_accepted_with_its_queue_defaults(db: asyncpg.Pool) -> None:
    before = datetime.now(UTC)

    row = await insert(db, "jobs", job())

    assert isinstance(row["id"], uuid.UUID)
    assert row["status"] == "pending"
    assert (row["width"], row["height"]) == (1024, 1024)
    assert row["params"] == {}
    assert (row["priority"], row["attempts"], row["max_attempts"]) == (0, 0, 3)
    assert row["cancel_requested"] is False
    assert row["steps"] is row["seed"] is row["backend"] is row["image_id"] is None
    for column in ("created_at", "run_at", "updated_at"):
        assert abs(row[column] - before) < timedelta(seconds=5), column


async def test_a_job_at_every_upper_bound_is_accepted(db: asyncpg.Pool) -> None:
    row = await insert(
        db,
        "jobs",
        job(
            prompt="x" * 8000,
            width=4096,
            height=64,
            steps=200,
            seed=2**53 - 1,
            priority=100,
            max_attempts=50,
            dedupe_key="k" * 200,
            params={"a": nested(31), "b": 10**64 - 1, "c": -(10**64 - 1), "d": 0.5**1000},
        ),
    )

    assert row["status"] == "pending"


async def test_two_live_jobs_cannot_share_a_dedupe_key(db: asyncpg.Pool) -> None:
    await insert(db, "jobs", job(dedupe_key="nightly-1"))

    with pytest.raises(asyncpg.UniqueViolationError) as caught:
        await insert(db, "jobs", job(dedupe_key="nightly-1"))

    assert caught.value.constraint_name == "jobs_dedupe_live"


async def test_a_finished_job_frees_its_dedupe_key(db: asyncpg.Pool) -> None:
    await insert(db, "jobs", job(dedupe_key="nightly-1", status="failed"))

    row = await insert(db, "jobs", job(dedupe_key="nightly-1"))

    assert row["status"] == "pending"


BAD_IMAGES = [
    pytest.param({"sha256": "ABC"}, "images_sha256_check", id="sha256 not 64 lowercase hex"),
    pytest.param({"bytes": -1}, "images_bytes_check", id="negative size"),
    pytest.param({"latency_ms": -5}, "images_latency_ms_check", id="negative latency"),
]


@pytest.mark.parametrize(("overrides", "constraint"), BAD_IMAGES)
async def test_a_malformed_image_is_rejected_by_its_named_check_constraint(
    db: asyncpg.Pool, overrides: dict[str, Any], constraint: str
) -> None:
    with pytest.raises(asyncpg.CheckViolationError) as caught:
        await insert(db, "images", image(**overrides))

    assert caught.value.constraint_name == constraint


async def test_two_images_cannot_share_a_storage_path(db: asyncpg.Pool) -> None:
    await insert(db, "images", image(storage_path="2026-01-01/a.png"))

    with pytest.raises(asyncpg.UniqueViolationError) as caught:
        await insert(db, "images", image(storage_path="2026-01-01/a.png"))

    assert caught.value.constraint_name == "images_storage_path_key"


async def test_a_job_can_point_only_at_an_existing_image(db: asyncpg.Pool) -> None:
    with pytest.raises(asyncpg.ForeignKeyViolationError) as caught:
        await insert(db, "jobs", job(image_id=uuid.uuid4()))

    assert caught.value.constraint_name == "jobs_image_id_fkey"
