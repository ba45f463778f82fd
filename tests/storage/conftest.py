"""Fixtures for the storage sinks: a fake Storage API and sinks pointed at it."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from imagen_worker.storage.supabase import SupabaseSink
from tests.fakes.storage import FakeStorage


@pytest.fixture
async def fake_storage() -> AsyncIterator[FakeStorage]:
    async with FakeStorage() as fake:
        yield fake
    assert fake.errors == [], "the fake Storage API raised inside a handler"


@pytest.fixture
async def make_sink(fake_storage: FakeStorage) -> AsyncIterator[Callable[..., SupabaseSink]]:
    """Sinks on the fake with millisecond backoff; closed after the test."""
    made: list[SupabaseSink] = []

    def make(**overrides: Any) -> SupabaseSink:
        options: dict[str, Any] = {
            "url": fake_storage.url,
            "key": fake_storage.service_key,
            "backoff_initial": 0.001,
            "backoff_max": 0.005,
            "max_retries": 3,
            **overrides,
        }
        sink = SupabaseSink(**options)
        made.append(sink)
        return sink

    yield make
    for sink in made:
        await sink.aclose()
