"""Capacity, lookahead and pools: keep the GPU busy without copying our backlog into ComfyUI."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from imagen_worker.backends.comfyui import ComfyUIBackend
from tests.backends.comfyui.conftest import BackendFactory
from tests.backends.comfyui.support import RecordingContext, make_request
from tests.fakes.comfyui import FakeComfyUI


@pytest.fixture
async def second_fake() -> AsyncIterator[FakeComfyUI]:
    async with FakeComfyUI() as server:
        yield server


async def _worker_loop(backend: ComfyUIBackend, jobs: asyncio.Queue[int], post_processing: float) -> None:
    """What the worker does per slot: generate, then download/upload while the GPU moves on."""
    while not jobs.empty():
        jobs.get_nowait()
        await backend.generate(make_request(), RecordingContext())
        await asyncio.sleep(post_processing)


async def _run_jobs(backend: ComfyUIBackend, count: int, post_processing: float, slots: int) -> None:
    jobs: asyncio.Queue[int] = asyncio.Queue()
    for n in range(count):
        jobs.put_nowait(n)
    await asyncio.gather(*(_worker_loop(backend, jobs, post_processing) for _ in range(slots)))


async def test_capacity_counts_lookahead_and_post_processing_per_instance(
    fake: FakeComfyUI, second_fake: FakeComfyUI, make_backend: BackendFactory
) -> None:
    assert (await make_backend(fake)).capacity == 3
    assert (await make_backend(fake, lookahead=0)).capacity == 2
    assert (await make_backend([fake.url, second_fake.url], lookahead=2)).capacity == 8


async def test_lookahead_bounds_our_prompts_in_one_instance(
    fake: FakeComfyUI, make_backend: BackendFactory
) -> None:
    backend = await make_backend(fake, lookahead=1)

    results = await asyncio.gather(*(backend.generate(make_request(), RecordingContext()) for _ in range(6)))

    client_id = results[0].metadata["client_id"]
    assert fake.max_queued_by_client == {client_id: 2}
    assert len({r.metadata["prompt_id"] for r in results}) == 6


async def test_with_lookahead_the_gpu_starts_the_next_prompt_during_post_processing(
    fake: FakeComfyUI, make_backend: BackendFactory
) -> None:
    fake.default_duration = 0.1
    serial = await make_backend(fake, lookahead=0)
    await _run_jobs(serial, count=3, post_processing=0.1, slots=1)
    one_at_a_time = fake.idle_gaps()
    fake.executions.clear()

    pipelined = await make_backend(fake, lookahead=1)
    await _run_jobs(pipelined, count=6, post_processing=0.1, slots=pipelined.capacity)
    with_lookahead = fake.idle_gaps()

    assert min(one_at_a_time) > 0.09  # one job at a time: the GPU waits for every upload
    assert max(with_lookahead) < 0.02  # the next prompt is already queued when one ends


async def test_two_instances_share_the_load_least_busy_first(
    fake: FakeComfyUI, second_fake: FakeComfyUI, make_backend: BackendFactory
) -> None:
    fake.default_duration = second_fake.default_duration = 0.1
    backend = await make_backend([fake.url, second_fake.url], lookahead=1)

    two = await asyncio.gather(*(backend.generate(make_request(), RecordingContext()) for _ in range(2)))
    assert sorted(r.metadata["instance"] for r in two) == sorted([fake.url, second_fake.url])

    await asyncio.gather(*(backend.generate(make_request(), RecordingContext()) for _ in range(6)))
    assert len(fake.executions) == len(second_fake.executions) == 4


async def test_a_dead_instance_in_the_pool_is_avoided(
    fake: FakeComfyUI, make_backend: BackendFactory
) -> None:
    backend = await make_backend(["http://127.0.0.1:9", fake.url], connect_timeout=0.2)

    results = await asyncio.gather(*(backend.generate(make_request(), RecordingContext()) for _ in range(4)))

    assert {r.metadata["instance"] for r in results} == {fake.url}  # jobs wait for the live one
