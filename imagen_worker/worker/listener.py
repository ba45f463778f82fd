"""The dedicated LISTEN connection: a wake-up hint, never the source of truth.

It lives outside the pool and never runs a transaction (a listener inside a transaction gets
nothing until it ends). Notifications only set events; the claim loop re-reads the table, and
a message on ``imagen_control`` only makes the worker re-read its running jobs' rows: anyone
who can connect can send one, so its payload is never trusted. A
lost connection is reconnected with backoff and then reported as a wake-up, so the loop runs
a catch-up claim: LISTEN first, then claim, so nothing falls into the gap. A notification that
arrived while disconnected is gone forever, which is why the safety poll exists.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from typing import Any

import asyncpg
import structlog
from tenacity import AsyncRetrying, retry_if_exception_type, wait_exponential, wait_random

from imagen_worker.db.connect import connect
from imagen_worker.queries import sql

JOBS_CHANNEL = "imagen_jobs"
CONTROL_CHANNEL = "imagen_control"

log = structlog.get_logger("imagen.listener")


class Listener:
    def __init__(
        self,
        dsn: str,
        on_wake: Callable[[], None],
        on_control: Callable[[], None],
        *,
        health_interval: float = 5.0,
        server_settings: Mapping[str, str] | None = None,
    ) -> None:
        self.dsn = dsn
        self.on_wake = on_wake
        self.on_control = on_control
        self.health_interval = health_interval
        self.server_settings = dict(server_settings or {})
        self.connected = False
        self.reconnects = 0
        self.backend_pid: int | None = None
        self._conn: asyncpg.Connection | None = None
        self._lost = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self._connect()
        self._task = asyncio.create_task(self._supervise(), name="imagen-listener")

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self._conn is not None and not self._conn.is_closed():
            await self._conn.close(timeout=2)
        self.connected = False

    async def _connect(self) -> None:
        conn = await connect(
            self.dsn,
            application_name="imagen-worker listener",
            timeout=10,
            server_settings=self.server_settings,
        )
        conn.add_termination_listener(self._terminated)
        await conn.add_listener(JOBS_CHANNEL, self._notified)
        await conn.add_listener(CONTROL_CHANNEL, self._notified)
        self._conn = conn
        self.backend_pid = conn.get_server_pid()
        self._lost.clear()
        self.connected = True

    def _terminated(self, _conn: Any) -> None:
        self.connected = False
        self._lost.set()

    def _notified(self, _conn: Any, _pid: int, channel: str, payload: str) -> None:
        if channel == CONTROL_CHANNEL:
            self.on_control()
        else:
            self.on_wake()

    async def _healthy(self) -> bool:
        conn = self._conn
        if conn is None or conn.is_closed():
            return False
        try:
            await conn.fetchval(sql("ping"), timeout=self.health_interval)
            return True
        except (asyncpg.PostgresError, OSError, TimeoutError, asyncpg.InterfaceError):
            return False

    async def _supervise(self) -> None:
        while True:
            try:
                async with asyncio.timeout(self.health_interval):
                    await self._lost.wait()
            except TimeoutError:
                if await self._healthy():
                    continue
            self.connected = False
            log.warning("listener connection lost; reconnecting")
            if self._conn is not None:
                self._conn.terminate()
            async for attempt in AsyncRetrying(
                wait=wait_exponential(multiplier=0.2, max=10) + wait_random(0, 0.2),
                retry=retry_if_exception_type(
                    (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError)
                ),
            ):
                with attempt:
                    await self._connect()
            self.reconnects += 1
            log.info("listener reconnected", reconnects=self.reconnects)
            self.on_wake()
            self.on_control()  # a cancel announced while disconnected is re-read from the rows
