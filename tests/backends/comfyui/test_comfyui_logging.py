"""Health polls of ComfyUI stay out of an info-level log: httpx request lines are debug only."""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator

import pytest
import structlog

from imagen_worker.observability.logging import configure_logging
from tests.backends.comfyui.conftest import BackendFactory
from tests.fakes.comfyui import FakeComfyUI


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    root, httpx_logger = logging.getLogger(), logging.getLogger("httpx")
    handlers, level, httpx_level = root.handlers[:], root.level, httpx_logger.level
    yield
    root.handlers, root.level = handlers, level
    httpx_logger.setLevel(httpx_level)
    structlog.reset_defaults()


@pytest.mark.parametrize(("level", "logged"), [("info", False), ("debug", True)])
async def test_health_polls_log_their_requests_only_at_debug(
    fake: FakeComfyUI, make_backend: BackendFactory, level: str, logged: bool
) -> None:
    backend = await make_backend(fake)
    out = io.StringIO()
    configure_logging(level, "json", stream=out)

    for _ in range(2):
        assert (await backend.health()).ok  # GET /system_stats and GET /prompt each time

    polls = [
        line
        for line in out.getvalue().splitlines()
        if "HTTP Request: GET" in line and ("/system_stats" in line or "/prompt " in line)
    ]
    assert len(polls) == (4 if logged else 0)
