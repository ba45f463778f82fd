"""``imagen prune``: an operator's retention in one command, with a dry run first."""

from __future__ import annotations

from pathlib import Path

import asyncpg

from tests.cli.test_imagen import run_imagen
from tests.workers import insert_job, write_config


async def test_prune_says_what_it_would_remove_then_removes_it(
    db: asyncpg.Pool, database_url: str, tmp_path: Path
) -> None:
    config = write_config(tmp_path)
    old = await insert_job(db, "cancelled long ago")
    await db.execute("UPDATE imagen.jobs SET cancel_requested = true WHERE id = $1", old)
    await db.execute("UPDATE imagen.jobs SET finished_at = now() - interval '8 days' WHERE id = $1", old)
    live = await insert_job(db, "still pending")

    dry = await run_imagen("prune", "--older-than", "1w", "--dry-run", dsn=database_url, config=config)
    kept = await db.fetchval("SELECT count(*) FROM imagen.jobs")
    real = await run_imagen("prune", "--older-than", "1w", dsn=database_url, config=config)

    assert dry.returncode == 0, dry.stderr
    assert dry.stdout.startswith("would remove 1 job (cancelled 1) and 0 webhook deliveries that ended")
    assert kept == 2
    assert real.returncode == 0, real.stderr
    assert real.stdout.startswith("removed 1 job (cancelled 1) and 0 webhook deliveries that ended before")
    assert real.stdout.rstrip().endswith("; images stay")
    assert [row["id"] for row in await db.fetch("SELECT id FROM imagen.jobs")] == [live]


async def test_an_age_that_is_not_one_is_refused_in_one_line(database_url: str, tmp_path: Path) -> None:
    config = write_config(tmp_path)
    for age in ("banana", "0d", "30", "-3d"):
        refused = await run_imagen("prune", "--older-than", age, dsn=database_url, config=config)
        assert refused.returncode == 64, (age, refused.stderr)
        assert refused.stderr.strip() == (
            f"imagen: --older-than {age!r}: expected a positive age like 30d, 12h, 2w or 90m"
        )
