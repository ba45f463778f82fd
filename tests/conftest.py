"""Shared fixtures: every test session gets its own fresh database on a real PostgreSQL.

Where the server comes from, first match wins: ``IMAGEN_TEST_DATABASE_URL`` (CI and this
machine), a testcontainers PostgreSQL when a Docker engine answers, else an embedded server
via pgserver. Migrations run once per session; each test starts from empty tables. Under
pytest-xdist (``make test`` runs two workers) every worker is its own session with its own
database, so nothing here is shared between workers but the server.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import asyncpg
import pytest

from imagen_worker.db.connect import connect, create_pool
from imagen_worker.db.migrate import migrate
from tests.fakes.comfyui import FakeComfyUI
from tests.fakes.storage import FakeStorage


def _docker_engine_answers() -> bool:
    try:
        import docker

        docker.from_env(timeout=2).ping()
        return True
    except Exception:
        return False


@pytest.fixture(scope="session")
def server_dsn(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A DSN for a maintenance database on a running server."""
    if url := os.environ.get("IMAGEN_TEST_DATABASE_URL"):
        yield url
        return
    if _docker_engine_answers():
        from testcontainers.postgres import PostgresContainer

        with PostgresContainer("postgres:16-alpine", driver=None) as pg:
            yield pg.get_connection_url()
        return
    from pgserver.postgres_server import get_server  # pgserver does not mark it re-exported

    server = get_server(tmp_path_factory.mktemp("pgdata"), cleanup_mode="stop")
    yield str(server.get_uri())
    server.cleanup()


def _with_database(dsn: str, name: str) -> str:
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(dsn)
    return urlunsplit(parts._replace(path=f"/{name}"))


@pytest.fixture(scope="session")
def database_url(server_dsn: str) -> Iterator[str]:
    """A fresh, migrated database for this test session, dropped afterwards."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
    name = f"imagen_test_{worker}_{os.getpid()}_{uuid.uuid4().hex[:8]}"

    async def create() -> None:
        admin = await asyncpg.connect(server_dsn)
        try:
            await admin.execute(f'CREATE DATABASE "{name}"')
        finally:
            await admin.close()
        conn = await connect(_with_database(server_dsn, name))
        try:
            await migrate(conn)
        finally:
            await conn.close()

    async def drop() -> None:
        admin = await asyncpg.connect(server_dsn)
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await admin.close()

    asyncio.run(create())
    yield _with_database(server_dsn, name)
    asyncio.run(drop())


@pytest.fixture
async def scratch_dsn(server_dsn: str) -> AsyncIterator[str]:
    """A brand-new, unmigrated database, dropped (even with connections left open) afterwards."""
    name = f"imagen_scratch_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(server_dsn)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    yield _with_database(server_dsn, name)
    admin = await asyncpg.connect(server_dsn)
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


@pytest.fixture
async def fake_comfyui() -> AsyncIterator[FakeComfyUI]:
    """A protocol-faithful ComfyUI on a loopback port."""
    async with FakeComfyUI() as server:
        yield server


@pytest.fixture(scope="session")
async def pool(database_url: str) -> AsyncIterator[asyncpg.Pool]:
    pool = await create_pool(database_url, max_size=8)
    yield pool
    await pool.close()


@pytest.fixture
async def db(pool: asyncpg.Pool) -> AsyncIterator[asyncpg.Pool]:
    """The session pool, with the queue tables emptied before the test."""
    await pool.execute("TRUNCATE imagen.jobs, imagen.images, imagen.workers CASCADE")
    yield pool


@pytest.fixture
async def storage(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[FakeStorage]:
    """A fake Supabase Storage that the environment points at, so cloud sync resolves to it."""
    async with FakeStorage() as fake:
        monkeypatch.setenv("SUPABASE_URL", fake.url)
        monkeypatch.setenv("SUPABASE_SERVICE_KEY", fake.service_key)
        yield fake
    assert fake.errors == [], "the fake Storage API raised inside a handler"


@pytest.fixture
def output_dir(tmp_path: Path) -> Path:
    path = tmp_path / "images"
    path.mkdir()
    return path


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No test reads the developer's config, data directory or cloud credentials."""
    for var in list(os.environ):
        if var.startswith(("IMAGEN_", "SUPABASE_", "MAI_")) and var != "IMAGEN_TEST_DATABASE_URL":
            monkeypatch.delenv(var)
    monkeypatch.delenv("DATABASE_URL", raising=False)
    # A file named by $IMAGEN_CONFIG must exist, so isolation moves the default location
    # instead: ~/.config/imagen.yaml of an empty home, which means defaults and environment.
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg-data"))
