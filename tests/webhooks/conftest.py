"""A webhook receiver on a loopback port that answers as each test scripts it."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import asyncpg
import pytest
from aiohttp import web

SECRET = "whsec-test-0123456789abcdef-not-real"


@dataclass
class Received:
    headers: dict[str, str]
    body: bytes
    at: float

    @property
    def json(self) -> Any:
        return json.loads(self.body)


class Receiver:
    """Records every POST; answers with the next scripted status (then ``default``).

    A script entry ``"hang"`` holds the request open until the test calls ``release()``.
    """

    def __init__(self) -> None:
        self.requests: list[Received] = []
        self.script: list[int | str] = []
        self.default = 200
        self.delay = 0.0
        self.url = ""
        self._released = asyncio.Event()
        self._runner: web.AppRunner | None = None

    def release(self) -> None:
        self._released.set()

    async def _handle(self, request: web.Request) -> web.Response:
        self.requests.append(Received(dict(request.headers), await request.read(), time.monotonic()))
        answer = self.script.pop(0) if self.script else self.default
        if answer == "hang":
            await self._released.wait()
            answer = self.default
        if self.delay:
            await asyncio.sleep(self.delay)
        return web.Response(status=int(answer), text="ok")

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/hooks/imagen", self._handle)
        self._runner = web.AppRunner(app, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = self._runner.addresses[0][1]
        self.url = f"http://127.0.0.1:{port}/hooks/imagen"

    async def stop(self) -> None:
        self.release()
        if self._runner is not None:
            await self._runner.cleanup()


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    server = Receiver()
    await server.start()
    yield server
    await server.stop()


@pytest.fixture
async def outbox_db(db: asyncpg.Pool) -> AsyncIterator[asyncpg.Pool]:
    """The session pool with the webhook tables emptied and webhooks off, as after install."""
    await db.execute("TRUNCATE imagen.webhook_deliveries, imagen.webhook_settings")
    yield db


@pytest.fixture
def secret(monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("IMAGEN_WEBHOOK_SECRET", SECRET)
    return SECRET


def hooks_block(url: str, **overrides: Any) -> dict[str, Any]:
    """A fast-retrying ``webhooks:`` block for tests."""
    return {
        "url": url, "timeout": 2, "max_attempts": 4, "backoff_base": 0.05, "backoff_max": 0.2,
        "poll_interval": 0.2, **overrides,
    }  # fmt: skip
