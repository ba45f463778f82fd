"""ComfyUI stopped, restarting or cut off: the backend holds work instead of failing it."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from imagen_worker.backends.comfyui import ComfyUIBackend
from imagen_worker.backends.comfyui.failures import UNAVAILABLE
from imagen_worker.backends.comfyui.pool import make_ref
from imagen_worker.errors import BackendUnavailable
from tests.backends.comfyui.conftest import BackendFactory
from tests.backends.comfyui.support import RecordingContext, make_request
from tests.fakes.comfyui import FakeComfyUI


@pytest.fixture
async def second_fake() -> AsyncIterator[FakeComfyUI]:
    async with FakeComfyUI() as server:
        yield server


class Wakeups:
    """The worker's side of ``Backend.watch``: counts the wake-ups."""

    def __init__(self, backend: ComfyUIBackend) -> None:
        self.count = 0
        backend.watch(self.wake)

    def wake(self) -> None:
        self.count += 1


async def until(predicate: object, within: float = 5.0) -> None:
    assert callable(predicate)
    async with asyncio.timeout(within):
        while not predicate():
            await asyncio.sleep(0.01)


async def test_an_outage_sets_the_reason_and_it_clears_on_its_own_when_comfyui_is_back(
    fake: FakeComfyUI, make_backend: BackendFactory
) -> None:
    backend = await make_backend(fake)
    wakeups = Wakeups(backend)
    assert (backend.capacity, backend.unavailable_reason) == (3, None)

    await fake.stop()
    await until(lambda: backend.unavailable_reason is not None)

    assert (backend.capacity, backend.unavailable_reason) == (0, UNAVAILABLE)
    assert "127.0.0.1" not in UNAVAILABLE and "http" not in UNAVAILABLE  # a web user may read it
    assert backend.unavailable_detail == f"no ComfyUI instance answers: {fake.url}", "the operator's"
    assert wakeups.count == 1
    await fake.start()  # same port, empty, as a restarted ComfyUI
    await until(lambda: backend.unavailable_reason is None)

    assert backend.capacity == 3
    assert backend.unavailable_detail is None
    assert wakeups.count == 2
    result = await asyncio.wait_for(backend.generate(make_request(), RecordingContext()), 5)
    assert result.image.read().startswith(b"\x89PNG")


async def test_a_job_whose_instance_dies_mid_run_goes_back_without_blame_and_runs_again(
    fake: FakeComfyUI, make_backend: BackendFactory
) -> None:
    backend = await make_backend(fake)
    ctx = RecordingContext()
    request = make_request("[fake:duration=5]", steps=20)
    job = asyncio.create_task(backend.generate(request, ctx))
    first = await fake.wait_running()
    loop = asyncio.get_running_loop()

    stopped = loop.time()
    await fake.stop()
    with pytest.raises(BackendUnavailable) as caught:
        await asyncio.wait_for(job, 5)

    assert loop.time() - stopped < 2  # noticed from the socket, not after poll retries
    assert caught.value.message.startswith("ComfyUI is unreachable (")
    assert caught.value.detail["instance"] == fake.url
    assert fake.executions[0].outcome == "lost"
    await fake.start()
    await until(lambda: backend.unavailable_reason is None)
    retry = RecordingContext(first_claim=False)
    result = await asyncio.wait_for(backend.generate(make_request(job_id=request.job_id), retry), 5)
    assert result.metadata["prompt_id"] != first  # the old prompt died with it
    assert retry.refs == [make_ref(result.metadata["prompt_id"], fake.url)], "a resubmission is recorded"


async def test_nothing_is_submitted_while_no_instance_answers(
    fake: FakeComfyUI, make_backend: BackendFactory
) -> None:
    backend = await make_backend(fake)
    await fake.stop()
    await until(lambda: backend.unavailable_reason is not None)
    ctx = RecordingContext()

    with pytest.raises(BackendUnavailable) as caught:
        await asyncio.wait_for(backend.generate(make_request(), ctx), 2)

    assert caught.value.message == (
        "ComfyUI is unreachable (no instance answers); the job waits until it answers again"
    )
    assert ctx.refs == []  # no prompt id was stored: there is nothing to adopt


async def test_with_several_instances_capacity_counts_the_healthy_ones_and_work_goes_there(
    fake: FakeComfyUI, second_fake: FakeComfyUI, make_backend: BackendFactory
) -> None:
    backend = await make_backend([fake.url, second_fake.url])
    wakeups = Wakeups(backend)
    assert backend.capacity == 6

    await second_fake.stop()
    await until(lambda: backend.capacity == 3)

    assert backend.unavailable_reason is None  # one instance still answers
    results = await asyncio.gather(*(backend.generate(make_request(), RecordingContext()) for _ in range(4)))
    assert {r.metadata["instance"] for r in results} == {fake.url}
    await second_fake.start()
    await until(lambda: backend.capacity == 6)
    assert wakeups.count >= 2


async def test_a_worker_booting_while_comfyui_is_down_starts_unavailable_and_picks_up_when_it_is_up(
    fake: FakeComfyUI, make_backend: BackendFactory
) -> None:
    await fake.stop()

    backend = await make_backend(fake, connect_timeout=0.3)
    wakeups = Wakeups(backend)

    assert (backend.capacity, backend.unavailable_reason) == (0, UNAVAILABLE)
    await fake.start()
    await until(lambda: backend.unavailable_reason is None)
    assert backend.capacity == 3 and wakeups.count == 1
