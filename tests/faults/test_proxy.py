"""The fault proxy itself, against the real PostgreSQL: each fault does what it says."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import asyncpg
import pytest

from tests.faults.proxy import FaultProxy


@pytest.fixture
def proxy(database_url: str) -> Iterator[FaultProxy]:
    with FaultProxy.for_dsn(database_url) as running:
        yield running


async def test_traffic_flows_through_the_proxy(proxy: FaultProxy, database_url: str) -> None:
    conn = await asyncpg.connect(proxy.dsn(database_url))
    try:
        assert await conn.fetchval("SELECT 41 + 1") == 42
        assert proxy.connections == 1
    finally:
        await conn.close()


async def test_a_server_on_a_unix_socket_is_reached_through_the_proxys_tcp_port(database_url: str) -> None:
    # The tests' embedded server listens on a Unix socket only, named in the DSN's query.
    conn = await asyncpg.connect(database_url)
    try:
        directories, port, name = await conn.fetchrow(
            "SELECT current_setting('unix_socket_directories'), current_setting('port'), current_database()"
        )
    finally:
        await conn.close()
    directory = directories.split(",")[0].strip()
    if not directory or not (Path(directory) / f".s.PGSQL.{port}").exists():
        pytest.skip("this server has no Unix socket on this host (a container's)")
    credentials = urlsplit(database_url).netloc.rpartition("@")[0] or "postgres"
    on_socket = f"postgresql://{credentials}@/{name}?host={directory}&port={port}"

    with FaultProxy.for_dsn(on_socket) as proxy:
        assert proxy.dsn(on_socket) == f"postgresql://{credentials}@127.0.0.1:{proxy.port}/{name}"
        through = await asyncpg.connect(proxy.dsn(on_socket))
        try:
            assert await through.fetchval("SELECT 41 + 1") == 42
            assert proxy.connections == 1
        finally:
            await through.close()


async def test_cut_resets_open_connections_and_new_ones_work(proxy: FaultProxy, database_url: str) -> None:
    conn = await asyncpg.connect(proxy.dsn(database_url))
    assert proxy.cut() == 1
    with pytest.raises((asyncpg.ConnectionDoesNotExistError, asyncpg.InterfaceError, OSError)):
        await conn.fetchval("SELECT 1")
    conn.terminate()
    again = await asyncpg.connect(proxy.dsn(database_url))
    try:
        assert await again.fetchval("SELECT 1") == 1
    finally:
        await again.close()


async def test_a_blackhole_stalls_a_session_without_losing_it(proxy: FaultProxy, database_url: str) -> None:
    conn = await asyncpg.connect(proxy.dsn(database_url))
    try:
        proxy.blackhole()
        with pytest.raises(TimeoutError):
            await conn.fetchval("SELECT 1", timeout=0.5)
        # asyncpg gives up on that query and the session is unusable; a new one stalls too.
        stalled = asyncio.ensure_future(asyncpg.connect(proxy.dsn(database_url)))
        await asyncio.sleep(0.5)
        assert not stalled.done(), "a blackholed path does not answer a new connection either"
        proxy.restore()
        late = await asyncio.wait_for(stalled, timeout=10)
        try:
            assert await late.fetchval("SELECT 2") == 2, "the stalled connect completes once restored"
        finally:
            await late.close()
    finally:
        conn.terminate()


async def test_a_statement_sent_during_a_blackhole_completes_after_restore(
    proxy: FaultProxy, database_url: str
) -> None:
    conn = await asyncpg.connect(proxy.dsn(database_url))
    try:
        proxy.blackhole()
        pending = asyncio.ensure_future(conn.fetchval("SELECT 7"))
        await asyncio.sleep(0.6)
        assert not pending.done()
        proxy.restore()
        assert await asyncio.wait_for(pending, timeout=5) == 7, "no byte was lost in the blackhole"
    finally:
        await conn.close()


async def test_delay_adds_latency_to_every_round_trip(proxy: FaultProxy, database_url: str) -> None:
    conn = await asyncpg.connect(proxy.dsn(database_url))
    try:
        proxy.delay(0.2)
        started = time.monotonic()
        await conn.fetchval("SELECT 1")
        assert time.monotonic() - started >= 0.4, "0.2 s each way"
        proxy.restore()
        started = time.monotonic()
        await conn.fetchval("SELECT 1")
        assert time.monotonic() - started < 0.2
    finally:
        await conn.close()
