"""What both command-line programs share: config, database, owner, async entry."""

from __future__ import annotations

import asyncio
import getpass
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, Any, TypeVar

import asyncpg
import typer

from imagen_worker.config import Config, load_config
from imagen_worker.db import migrate as migrations
from imagen_worker.db.connect import connect, resolve_dsn
from imagen_worker.errors import ConfigError

T = TypeVar("T")

ConfigOption = Annotated[
    Path | None,
    typer.Option("--config", "-c", help="imagen.yaml (default: $IMAGEN_CONFIG, then ~/.config/imagen.yaml)"),
]

# Jobs submitted from a terminal without a configured owner belong to a stable per-OS-user id,
# so `imagen list` on the same machine shows them and a web user's id is never guessed.
_LOCAL_OWNERS = uuid.UUID("6f0d8e52-3b7c-4a43-9a55-6b2b7f1f2a10")


def local_owner() -> uuid.UUID:
    return uuid.uuid5(_LOCAL_OWNERS, getpass.getuser())


def owner_of(config: Config, explicit: str | None = None) -> uuid.UUID:
    value = explicit or config.owner_user_id
    try:
        return uuid.UUID(value) if value else local_owner()
    except ValueError:
        raise ConfigError(f"owner user id is not a UUID: {value!r}") from None


def fail(program: str, message: str, code: int = 1) -> typer.Exit:
    typer.echo(f"{program}: {message}", err=True)
    return typer.Exit(code)


def run(program: str, coro_factory: Callable[[], Awaitable[T]]) -> T:
    """Run a command's coroutine; configuration and database errors become one clear line."""

    async def main() -> T:
        return await coro_factory()

    try:
        return asyncio.run(main())
    except ConfigError as exc:
        raise fail(program, str(exc)) from None
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        raise fail(program, f"database: {exc}") from None


def load(config_path: Path | None) -> Config:
    return load_config(config_path)


def with_database(
    program: str,
    config_path: Path | None,
    action: Callable[[asyncpg.Connection, Config], Awaitable[int | None]],
) -> int:
    """Run a command against the queue database; returns its exit code."""

    async def go() -> int | None:
        config = load(config_path)
        async with database(config) as conn:
            return await action(conn, config)

    return run(program, go) or 0


@asynccontextmanager
async def database(config: Config) -> AsyncIterator[asyncpg.Connection]:
    """A connection to the queue; an embedded database is migrated on first use."""
    embedded = config.database_url() is None
    conn = await connect(resolve_dsn(config))
    try:
        todo = await migrations.pending(conn)
        if todo and embedded:
            await migrations.migrate(conn)
        elif todo:
            raise ConfigError(
                f"the database schema is behind ({', '.join(m.version for m in todo)} not applied): "
                "run `imagen-worker migrate`"
            )
        yield conn
    finally:
        await conn.close()


def parse_params(items: list[str]) -> dict[str, Any]:
    """``k=v`` pairs; values that parse as JSON (numbers, true, lists) keep their type."""
    import json

    params: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--param {item!r}: expected KEY=VALUE")
        try:
            params[key] = json.loads(value)
        except ValueError:
            params[key] = value
    return params


def parse_size(size: str) -> tuple[int, int]:
    width, sep, height = size.lower().partition("x")
    if not sep or not width.isdigit() or not height.isdigit():
        raise ConfigError(f"--size {size!r}: expected WIDTHxHEIGHT, e.g. 1024x768")
    return int(width), int(height)
