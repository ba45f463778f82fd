"""Fixtures for the ComfyUI adapter specs: a fake ComfyUI and backends pointed at it."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from imagen_worker.backends.comfyui import ComfyUIBackend
from tests.backends.comfyui.support import FAST
from tests.fakes.comfyui import FakeComfyUI


@pytest.fixture
def fake(fake_comfyui: FakeComfyUI) -> FakeComfyUI:
    return fake_comfyui


BackendFactory = Callable[..., Awaitable[ComfyUIBackend]]


@pytest.fixture
async def make_backend() -> AsyncIterator[BackendFactory]:
    """``await make_backend(fake_or_urls, **config)``: a started backend, closed after the test."""
    made: list[ComfyUIBackend] = []

    async def factory(target: FakeComfyUI | list[str], **config: Any) -> ComfyUIBackend:
        urls = [target.url] if isinstance(target, FakeComfyUI) else target
        block: dict[str, Any] = {"type": "comfyui", "urls": urls, "workflow": "sd15", **FAST, **config}
        backend = ComfyUIBackend.from_config("gpu", block)
        made.append(backend)
        await backend.start()
        return backend

    yield factory
    for backend in made:
        await backend.aclose()
