"""Migrations: applied in order, exactly once, safely from several processes, never silently edited."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest

from imagen_worker.db.connect import connect
from imagen_worker.db.migrate import discover, migrate, migrations_dir
from imagen_worker.errors import ConfigError

IMAGEN_WORKER = Path(sys.executable).with_name("imagen-worker")
ALL_VERSIONS = [m.version for m in discover()]


async def _recorded(conn: asyncpg.Connection) -> list[asyncpg.Record]:
    rows: list[asyncpg.Record] = await conn.fetch(
        "SELECT version, checksum, applied_at FROM imagen.schema_migrations ORDER BY version"
    )
    return rows


async def _run_cli(*args: str, database_url: str) -> tuple[int, str, str]:
    env = {**os.environ, "IMAGEN_DATABASE_URL": database_url}
    process = await asyncio.create_subprocess_exec(
        str(IMAGEN_WORKER),
        *args,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await process.communicate()
    assert process.returncode is not None
    return process.returncode, stdout.decode(), stderr.decode()


@pytest.fixture
async def scratch(scratch_dsn: str) -> AsyncIterator[asyncpg.Connection]:
    conn = await connect(scratch_dsn)
    yield conn
    await conn.close()


def test_the_repository_ships_numbered_migrations_in_order() -> None:
    assert sorted(ALL_VERSIONS) == ALL_VERSIONS
    assert ALL_VERSIONS[:2] == ["0001_jobs_and_images", "0002_roles_and_rls"]


async def test_migrate_on_an_empty_database_applies_every_file_and_records_its_checksum(
    scratch: asyncpg.Connection,
) -> None:
    applied = await migrate(scratch)

    assert applied == ALL_VERSIONS
    recorded = {row["version"]: row["checksum"] for row in await _recorded(scratch)}
    assert recorded == {m.version: m.checksum for m in discover()}
    for table in ("imagen.jobs", "imagen.images", "imagen.workers"):
        assert await scratch.fetchval("SELECT to_regclass($1) IS NOT NULL", table), table


async def test_migrate_again_is_a_no_op(scratch: asyncpg.Connection) -> None:
    await migrate(scratch)
    before = await _recorded(scratch)

    applied_again = await migrate(scratch)

    assert applied_again == []
    assert await _recorded(scratch) == before


async def test_three_concurrent_migrate_processes_apply_each_file_exactly_once(scratch_dsn: str) -> None:
    results = await asyncio.gather(*(_run_cli("migrate", database_url=scratch_dsn) for _ in range(3)))

    assert [code for code, _, _ in results] == [0, 0, 0], results
    applied_by_process: list[str] = []
    for _, stdout, _ in results:
        if match := re.search(r"^applied (.+)$", stdout, re.MULTILINE):
            applied_by_process.extend(match.group(1).split(", "))
        else:
            assert "schema is up to date" in stdout
    assert sorted(applied_by_process) == ALL_VERSIONS
    conn = await connect(scratch_dsn)
    try:
        assert [row["version"] for row in await _recorded(conn)] == ALL_VERSIONS
    finally:
        await conn.close()


async def test_an_applied_migration_that_was_edited_is_refused_naming_its_version(
    scratch: asyncpg.Connection, tmp_path: Path
) -> None:
    directory = tmp_path / "migrations"
    shutil.copytree(migrations_dir(), directory)
    await migrate(scratch, directory)
    edited = directory / "0002_roles_and_rls.sql"
    edited.write_text(edited.read_text() + "\n-- a harmless-looking edit\n")

    with pytest.raises(ConfigError, match=r"migration 0002_roles_and_rls was changed after it was applied"):
        await migrate(scratch, directory)


async def test_dry_run_prints_the_pending_sql_and_changes_nothing(scratch_dsn: str) -> None:
    code, stdout, stderr = await _run_cli("migrate", "--dry-run", database_url=scratch_dsn)

    assert code == 0, stderr
    assert "-- 0001_jobs_and_images" in stdout
    assert "CREATE TABLE imagen.jobs" in stdout
    conn = await connect(scratch_dsn)
    try:
        assert await conn.fetchval("SELECT to_regclass('imagen.jobs')") is None
        assert await conn.fetchval("SELECT to_regnamespace('imagen')") is None
    finally:
        await conn.close()
