"""What both command-line programs share: config, database, owner, input checks, async entry."""

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

from imagen_worker.cli import failures
from imagen_worker.cli.failures import InputError
from imagen_worker.config import Config, load_config
from imagen_worker.db import migrate as migrations
from imagen_worker.db.connect import connect, describe_dsn, resolve_dsn
from imagen_worker.errors import ConfigError, SchemaError

T = TypeVar("T")

ConfigOption = Annotated[
    Path | None,
    typer.Option(
        "--config",
        "-c",
        help="imagen.yaml to read; must exist (default: $IMAGEN_CONFIG, then ~/.config/imagen.yaml)",
        show_default=False,
    ),
]

# What the database accepts (migrations/0001_jobs_and_images.sql); checked here first so a
# typo gets the allowed range instead of a constraint name and the whole failing row.
SIDE = (64, 4096)
STEPS = (1, 200)
PRIORITY = (-100, 100)
SEED = (0, 2**53 - 1)  # the largest integer a JSON client (a web page) reads exactly
PROMPT_MAX = 8000
STATUSES = ("pending", "running", "done", "failed", "cancelled")

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
        error = InputError if explicit else ConfigError
        raise error(f"owner user id is not a UUID: {value!r}") from None


def fail(program: str, message: str, code: int = failures.Code.FAILED) -> typer.Exit:
    """A command's own refusal (not an exception): its line, and its exit code."""
    failures.report(program, code, message)
    return typer.Exit(code)


def run(program: str, coro_factory: Callable[[], Awaitable[T]]) -> T:
    """Run a command's coroutine; any failure becomes one clear line and its exit code."""

    async def main() -> T:
        return await coro_factory()

    result: T = failures.guarded(program, lambda: asyncio.run(main()))
    return result


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
    dsn = resolve_dsn(config)
    failures.set_database(describe_dsn(dsn) if not embedded else f"the embedded server ({describe_dsn(dsn)})")
    conn = await connect(dsn)
    try:
        todo = await migrations.pending(conn)
        if todo and embedded:
            await migrations.migrate(conn)
        elif todo:
            raise SchemaError(
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
            raise InputError(f"--param {item!r}: expected KEY=VALUE")
        try:
            params[key] = json.loads(value)
        except ValueError:
            params[key] = value
    return params


def parse_size(size: str) -> tuple[int, int]:
    width, sep, height = size.lower().partition("x")
    if not sep or not width.isdigit() or not height.isdigit():
        raise InputError(f"--size {size!r}: expected WIDTHxHEIGHT, e.g. 1024x768")
    low, high = SIDE
    for side in (int(width), int(height)):
        if not low <= side <= high or side % 8:
            raise InputError(
                f"--size {size}: width and height must be multiples of 8 between {low} and {high}"
            )
    return int(width), int(height)


def check_range(flag: str, value: int | None, bounds: tuple[int, int]) -> None:
    if value is not None and not bounds[0] <= value <= bounds[1]:
        raise InputError(f"{flag} {value}: must be between {bounds[0]} and {bounds[1]}")


def check_prompt(prompt: str, flag: str = "the prompt") -> None:
    if not prompt.strip():
        raise InputError(f"{flag} is empty: describe the image to generate")
    if len(prompt) > PROMPT_MAX:
        raise InputError(f"{flag} has {len(prompt)} characters; at most {PROMPT_MAX} are accepted")
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError:  # bytes the terminal's encoding could not decode (surrogate escapes)
        raise InputError(f"{flag} is not valid UTF-8 text; check the terminal's encoding") from None


def check_status(status: str | None) -> str | None:
    if status is not None and status not in STATUSES:
        raise InputError(f"--status {status!r}: use one of {', '.join(STATUSES)}")
    return status
