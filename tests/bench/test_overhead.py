"""The overhead benchmark's floor: the commits a job's promises need, through the worker's own
statements, each one measured and each job really recorded."""

from __future__ import annotations

import asyncpg

from bench.overhead import ALL, COMMITS, OWNER, commit_floor


async def test_the_commit_floor_records_every_job_it_times(db: asyncpg.Pool, database_url: str) -> None:
    floor = await commit_floor(database_url, 3)

    assert set(floor) == {*COMMITS, ALL}
    assert all(summary["n"] == 3 for summary in floor.values())
    assert floor[ALL]["min_ms"] >= max(floor[name]["min_ms"] for name in COMMITS)
    rows = await db.fetch(
        "SELECT j.status, j.image_id IS NOT NULL AS linked FROM imagen.jobs j WHERE j.owner_user_id = $1",
        OWNER,
    )
    assert [(row["status"], row["linked"]) for row in rows] == [("done", True)] * 3
