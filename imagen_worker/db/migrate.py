"""Apply ``migrations/NNNN_name.sql`` in order, exactly once each, across concurrent workers.

An advisory lock serialises migrators (several workers booting at once apply each file once);
each file runs in its own transaction together with its ``imagen.schema_migrations`` row; an
applied file whose checksum changed is refused, because silently diverging schemas are worse
than a worker that will not start.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

import asyncpg

from imagen_worker.errors import ConfigError, SchemaError
from imagen_worker.queries import sql

_LOCK_KEY = 0x1A6E_0001  # arbitrary, stable: "imagen migrations"
_NAME = re.compile(r"^(\d{4})_[a-z0-9_]+\.sql$")


@dataclass(frozen=True)
class Migration:
    version: str
    path: Path

    @property
    def sql(self) -> str:
        return self.path.read_text(encoding="utf-8")

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.path.read_bytes()).hexdigest()


def migrations_dir() -> Path:
    """The repository's ``migrations/`` in a checkout, the packaged copy in a wheel."""
    here = Path(__file__).resolve().parents[1]
    for candidate in (here.parent / "migrations", here / "_migrations"):
        if candidate.is_dir():
            return candidate
    raise ConfigError("migrations directory not found (broken installation)")


def discover(directory: Path | None = None) -> list[Migration]:
    found = []
    for path in sorted((directory or migrations_dir()).iterdir()):
        if _NAME.match(path.name):
            found.append(Migration(version=path.name.removesuffix(".sql"), path=path))
    versions = [m.version[:4] for m in found]
    if len(set(versions)) != len(versions):
        raise ConfigError(f"two migrations share a number: {versions}")
    return found


async def applied(conn: asyncpg.Connection) -> dict[str, str]:
    exists = await conn.fetchval(sql("migrations_table_exists"))
    if not exists:
        return {}
    rows = await conn.fetch(sql("migrations_applied"))
    return {row["version"]: row["checksum"] for row in rows}


def _check_tampering(done: dict[str, str], available: list[Migration]) -> None:
    for migration in available:
        recorded = done.get(migration.version)
        if recorded is not None and recorded != migration.checksum:
            raise SchemaError(
                f"migration {migration.version} was changed after it was applied "
                f"(recorded sha256 {recorded[:12]}…, file {migration.checksum[:12]}…); "
                "add a new migration instead of editing an applied one"
            )


async def pending(conn: asyncpg.Connection, directory: Path | None = None) -> list[Migration]:
    available = discover(directory)
    done = await applied(conn)
    _check_tampering(done, available)
    return [m for m in available if m.version not in done]


async def migrate(conn: asyncpg.Connection, directory: Path | None = None) -> list[str]:
    """Apply what is pending; returns the versions this call applied."""
    await conn.execute(sql("migrations_lock"), _LOCK_KEY)
    try:
        await conn.execute(sql("migrations_bootstrap"))
        todo = await pending(conn, directory)
        for migration in todo:
            async with conn.transaction():
                await conn.execute(migration.sql)
                await conn.execute(sql("migrations_record"), migration.version, migration.checksum)
        return [m.version for m in todo]
    finally:
        await conn.execute(sql("migrations_unlock"), _LOCK_KEY)


async def dry_run(conn: asyncpg.Connection, directory: Path | None = None) -> str:
    """The SQL ``migrate`` would run now, without running it."""
    todo = await pending(conn, directory)
    return "\n".join(f"-- {m.version}\n{m.sql.rstrip()}\n" for m in todo)
