"""Connections: a configured DSN, or an embedded PostgreSQL so a fresh install just works.

With no database configured, ``imagen-worker run`` and ``imagen`` share one embedded server
(pgserver) in the user data directory; the first caller starts it, later ones reuse it, and
it keeps running after they exit so a worker and a CLI in another terminal see the same queue.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import asyncpg

from imagen_worker.config import Config, DatabaseConfig, data_dir
from imagen_worker.errors import ConfigError, EmbeddedServerError, UnreadableJson


def embedded_dsn(directory: Path | None = None) -> str:
    """Start (or reuse) the embedded server and return its DSN."""
    # pgserver narrates every start and stop at INFO and dumps a failure's command lines and
    # log at ERROR: a failure becomes one EmbeddedServerError sentence here instead. platformdirs
    # warns about a missing XDG_RUNTIME_DIR on servers; neither helps the user.
    logging.getLogger("pgserver").setLevel(logging.CRITICAL)
    warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR.*")
    try:
        import pgserver
    except ImportError:
        raise ConfigError(
            "no database configured and the embedded server is not installed: set "
            "IMAGEN_DATABASE_URL, or install imagen-worker again with its embedded extra "
            "(pip install 'dist/imagen_worker-<version>-py3-none-any.whl[embedded]', or '.[embedded]' "
            "in a checkout)"
        ) from None
    path = directory or data_dir() / "pgdata"
    path.mkdir(parents=True, exist_ok=True)
    try:
        server = pgserver.get_server(path, cleanup_mode=None)  # type: ignore[attr-defined]
    except (OSError, subprocess.SubprocessError) as exc:
        raise EmbeddedServerError(
            f"the embedded PostgreSQL in {path} did not start: {_why(path, exc)}; its log is "
            f"{path / 'log'} (move the directory aside to start with an empty queue, or set "
            "IMAGEN_DATABASE_URL to use a server of your own)"
        ) from exc
    return str(server.get_uri())


def _why(path: Path, exc: OSError | subprocess.SubprocessError) -> str:
    """The reason in the server's own words: the last line of its log when pg_ctl gave up."""
    if isinstance(exc, OSError):
        if exc.filename == "useradd":  # run as root, pgserver creates a user to run PostgreSQL
            return (
                "useradd was not found (as root, PostgreSQL runs as a user that pgserver creates: "
                "put /usr/sbin on PATH)"
            )
        return f"{exc.filename}: {exc.strerror}" if exc.filename else str(exc)
    if not isinstance(exc, subprocess.CalledProcessError | subprocess.TimeoutExpired):
        return str(exc)
    command = Path(str(exc.cmd[0] if isinstance(exc.cmd, list | tuple) else exc.cmd)).name
    log = path / "log"
    if command == "pg_ctl" and log.is_file():
        lines = log.read_text(encoding="utf-8", errors="replace").splitlines()
        if last := next((line.strip() for line in reversed(lines) if line.strip()), None):
            return last
    if isinstance(exc, subprocess.TimeoutExpired):
        return f"{command} did not finish within {exc.timeout:g} s"
    return f"{command} exited with status {exc.returncode}"


def describe_dsn(dsn: str) -> str:
    """``host:port/database`` for messages and logs, never the password; a Unix socket named in
    the query (the embedded server's) stands for the host."""
    parts = urlsplit(dsn)
    if not parts.scheme.startswith("postgres"):
        return "the configured database"
    host = parts.hostname or next(iter(parse_qs(parts.query).get("host", [])), "localhost")
    port = f":{parts.port}" if parts.port else ""
    return f"{host}{port}{parts.path or '/'}"


def resolve_dsn(config: Config) -> str:
    return config.database_url() or embedded_dsn()


def _loads(text: str) -> Any:
    """``json.loads``, or ``UnreadableJson`` for what the database took and Python cannot hold."""
    try:
        return json.loads(text)
    except RecursionError:
        return UnreadableJson("arrays or objects are nested too deeply")
    except ValueError:  # the text is valid JSON (PostgreSQL checked it): an integer too long
        return UnreadableJson(f"a number has more than {sys.get_int_max_str_digits()} digits")


async def _init_connection(conn: asyncpg.Connection) -> None:
    for kind in ("json", "jsonb"):
        await conn.set_type_codec(kind, encoder=json.dumps, decoder=_loads, schema="pg_catalog")


async def _reset_transaction_only(conn: asyncpg.Connection) -> None:
    """Only a connection left inside a transaction needs the full reset (it rolls back)."""
    if conn.is_in_transaction():
        await conn.reset()


async def connect(dsn: str, *, application_name: str = "imagen", **kwargs: Any) -> asyncpg.Connection:
    """A connection named in ``pg_stat_activity``, so operators can tell ours apart."""
    settings = {"application_name": application_name, **kwargs.pop("server_settings", {})}
    conn: asyncpg.Connection = await asyncpg.connect(dsn, server_settings=settings, **kwargs)
    await _init_connection(conn)
    return conn


async def create_pool(
    dsn: str,
    *,
    min_size: int = 1,
    max_size: int = 10,
    application_name: str = "imagen-worker",
    limits: DatabaseConfig | None = None,
    full_reset: bool = True,
) -> asyncpg.Pool:
    """A pool; with ``limits``, every statement and session is bounded (see ``DatabaseConfig``).

    A stalled server then surfaces as a timeout the caller handles, never as a hang. Without
    ``full_reset`` a connection goes back to the pool without asyncpg's reset statement, for
    code that takes no session state on pool connections (no SET, LISTEN, cursor or session
    advisory lock): the worker, where that statement was one round trip per release.
    """
    settings = {"application_name": application_name}
    command_timeout = None
    if limits is not None:
        settings.update(limits.session_settings())
        command_timeout = limits.command_timeout or None
    pool = await asyncpg.create_pool(
        dsn,
        min_size=min_size,
        max_size=max_size,
        init=_init_connection,
        server_settings=settings,
        command_timeout=command_timeout,
        timeout=command_timeout or 60,
        **({} if full_reset else {"reset": _reset_transaction_only}),
    )
    assert pool is not None
    return pool
