"""Params PostgreSQL holds and Python cannot read: a number past Python's 4,300-digit limit for
integers, or arrays nested past its recursion limit. Since 0012 the database refuses both at
INSERT (``jobs_params_plain``); rows from before it, which the check leaves alone, fail on their
own with a sentence saying why, and never take the claim down with them: before, the claim
committed, its rows could not be decoded, and they stayed running, re-taken forever with any
job claimed beside them.
"""

from __future__ import annotations

import shutil
import uuid
from pathlib import Path

import asyncpg
import pytest

from imagen_worker.db.connect import connect
from imagen_worker.db.migrate import migrate
from tests.hostile.test_hostile_input import request_as
from tests.workers import make_config, running_worker, terminal

MIGRATIONS = Path(__file__).resolve().parents[2] / "migrations"
OWNER = uuid.UUID("00000000-0000-4000-8000-0000000000a1")
OTHER = uuid.UUID("00000000-0000-4000-8000-0000000000b2")
UNREADABLE = {
    '{"scale": 1' + "0" * 5000 + "}": "a number has more than 4300 digits",
    '{"a": ' + "[" * 2000 + "]" * 2000 + "}": "arrays or objects are nested too deeply",
}
INSERT = (
    "INSERT INTO imagen.jobs (owner_user_id, prompt, params)"
    " VALUES ($1, 'a fox', $2::text::jsonb) RETURNING id"
)
REFUSED = "params may nest at most 32 levels and hold no number of 1e64 or more in magnitude"


async def insert(conn: asyncpg.Connection, owner: uuid.UUID, params: str) -> uuid.UUID:
    job_id: uuid.UUID = await conn.fetchval(INSERT, owner, params)
    return job_id


async def test_rows_from_before_the_params_check_fail_alone_and_the_queue_goes_on(
    scratch_dsn: str, tmp_path: Path
) -> None:
    before = tmp_path / "migrations"
    before.mkdir()
    for path in sorted(MIGRATIONS.glob("*.sql")):
        if path.name < "0012":
            shutil.copy(path, before)
    conn = await connect(scratch_dsn)
    try:
        await migrate(conn, before)
        unreadable = {await insert(conn, OWNER, params): error for params, error in UNREADABLE.items()}
        readable = [await insert(conn, OTHER, "{}") for _ in range(3)]
        await migrate(conn)  # the upgrade: the new check does not refuse the rows already there

        async with running_worker(make_config(tmp_path, worker={"concurrency": 8}), scratch_dsn):
            for job_id, error in unreadable.items():
                row = await terminal(conn, job_id, within=20)
                assert (row["status"], row["error"], row["attempts"]) == (
                    "failed",
                    f"params cannot be read: {error}",
                    1,
                )
            for job_id in readable:
                row = await terminal(conn, job_id, within=20)
                assert (row["status"], row["attempts"]) == ("done", 1), row["error"]
        assert await conn.fetchval("SELECT count(*) FROM imagen.jobs WHERE status <> 'done'") == 2
    finally:
        await conn.close()


@pytest.mark.parametrize("params", UNREADABLE)
async def test_a_web_user_cannot_insert_such_params(db: asyncpg.Pool, params: str) -> None:
    async with request_as(db, OWNER) as conn:
        with pytest.raises(asyncpg.CheckViolationError) as refused:
            await conn.execute(INSERT, OWNER, params)
    assert refused.value.constraint_name == "jobs_params_plain"
    assert refused.value.detail == REFUSED
