"""A TCP fault proxy between worker processes and PostgreSQL: cut, blackhole, delay, restore.

It runs its own event loop in a daemon thread, so a test may block its own loop (waiting for a
worker process to exit) without freezing the traffic of the workers it observes. Every control
method is thread-safe and returns once the fault is in force.

* ``cut()`` aborts every open connection (both sides see a reset); new connections work.
* ``blackhole()`` keeps every socket open and accepts new ones, but forwards nothing: bytes
  already read wait in the proxy, the rest waits in the kernel's buffers, exactly like a
  network path that silently drops packets and retransmits once it heals. Nothing is lost,
  so after ``restore()`` the sessions carry on (unless a side timed out meanwhile).
* ``delay(seconds)`` adds latency to every chunk in both directions.
* ``restore()`` ends the blackhole and the delay.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Coroutine
from typing import Any, Self, TypeVar
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

_CHUNK = 65536
_T = TypeVar("_T")


class FaultProxy:
    def __init__(self, upstream_host: str, upstream_port: int) -> None:
        self.upstream = (upstream_host, upstream_port)
        self.port = 0
        self.accepted = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="fault-proxy", daemon=True)
        self._server: asyncio.Server | None = None
        self._open = asyncio.Event()  # set: traffic flows; clear: blackhole
        self._delay = 0.0
        self._writers: set[asyncio.StreamWriter] = set()  # both ends of every connection
        self._clients: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    @classmethod
    def for_dsn(cls, dsn: str) -> Self:
        parts = urlsplit(dsn)
        query = dict(parse_qsl(parts.query))
        host = query.get("host") or parts.hostname or "127.0.0.1"
        return cls(host, int(query.get("port") or parts.port or 5432))

    def dsn(self, dsn: str) -> str:
        """``dsn`` with its host and port (in the address or the query) replaced by this proxy's."""
        parts = urlsplit(dsn)
        credentials = parts.netloc.rpartition("@")[0]
        netloc = f"{credentials}@127.0.0.1:{self.port}" if credentials else f"127.0.0.1:{self.port}"
        query = urlencode([(k, v) for k, v in parse_qsl(parts.query) if k not in ("host", "port")])
        return urlunsplit(parts._replace(netloc=netloc, query=query))

    # --- lifecycle (call from any thread) ------------------------------------------------

    def start(self) -> None:
        self._thread.start()
        self._call(self._start())

    def close(self) -> None:
        if not self._thread.is_alive():
            return
        self._call(self._close())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)
        self._loop.close()

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- faults ----------------------------------------------------------------------

    def cut(self) -> int:
        """Abort every open connection; returns how many sockets were reset."""
        return self._call(self._cut())

    def blackhole(self) -> None:
        self._call(self._set(open_=False))

    def delay(self, seconds: float) -> None:
        self._call(self._set(delay=seconds))

    def restore(self) -> None:
        self._call(self._set(open_=True, delay=0.0))

    @property
    def connections(self) -> int:
        """Client connections open right now."""
        return self._call(self._count())

    # --- inside the proxy's loop ---------------------------------------------------------

    def _call(self, coro: Coroutine[Any, Any, _T]) -> _T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout=10)

    async def _start(self) -> None:
        self._open.set()
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _close(self) -> None:
        if self._server is not None:
            self._server.close()
        await self._cut()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _cut(self) -> int:
        clients = len(self._clients)
        for writer in list(self._writers):
            writer.transport.abort()
        self._writers.clear()
        self._clients.clear()
        return clients

    async def _set(self, *, open_: bool | None = None, delay: float | None = None) -> None:
        if delay is not None:
            self._delay = delay
        if open_ is True:
            self._open.set()
        elif open_ is False:
            self._open.clear()

    async def _count(self) -> int:
        return len(self._clients)

    async def _connect_upstream(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        # A host that is a directory names a Unix socket there (libpq's rule): the embedded
        # server of the tests listens on nothing else.
        host, port = self.upstream
        if host.startswith("/"):
            return await asyncio.open_unix_connection(f"{host}/.s.PGSQL.{port}")
        return await asyncio.open_connection(host, port)

    async def _serve(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        self._writers.add(client_writer)
        self._clients.add(client_writer)
        await self._open.wait()  # a blackholed path does not even reach the server
        try:
            server_reader, server_writer = await self._connect_upstream()
        except OSError:
            client_writer.transport.abort()
            self._writers.discard(client_writer)
            self._clients.discard(client_writer)
            return
        self._writers.add(server_writer)
        pumps = [
            asyncio.create_task(self._pump(client_reader, server_writer)),
            asyncio.create_task(self._pump(server_reader, client_writer)),
        ]
        self._tasks.update(pumps)
        try:
            await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in pumps:
                task.cancel()
            await asyncio.gather(*pumps, return_exceptions=True)
            self._tasks.difference_update(pumps)
            self._clients.discard(client_writer)
            for writer in (client_writer, server_writer):
                self._writers.discard(writer)
                writer.transport.abort()

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError, asyncio.IncompleteReadError):
            while data := await reader.read(_CHUNK):
                await self._open.wait()
                if self._delay:
                    await asyncio.sleep(self._delay)
                    await self._open.wait()
                writer.write(data)
                await writer.drain()
