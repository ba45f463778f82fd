"""Stopping a prompt: user cancel (running, pending or still being posted) and the per-job deadline."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from imagen_worker.backends.comfyui import ComfyUIBackend
from imagen_worker.errors import RetryableError
from tests.backends.comfyui.conftest import BackendFactory
from tests.backends.comfyui.support import RecordingContext, make_request
from tests.fakes.comfyui import FakeComfyUI


@pytest.fixture
async def newer_fake() -> AsyncIterator[FakeComfyUI]:
    """A server with the Jobs API (``POST /api/jobs/{id}/cancel``)."""
    async with FakeComfyUI(jobs_api=True) as server:
        yield server


async def cancelled_while_running(fake: FakeComfyUI, backend: ComfyUIBackend) -> str:
    """A job cancelled by its owner while its prompt runs; the prompt's id."""
    job = asyncio.create_task(
        backend.generate(make_request("slow [fake:duration=5]", steps=50), RecordingContext())
    )
    prompt_id = await fake.wait_running()
    job.cancel()
    with pytest.raises(asyncio.CancelledError):
        await job
    return prompt_id


async def test_cancelling_a_running_prompt_interrupts_exactly_that_prompt(
    fake: FakeComfyUI, make_backend: BackendFactory
) -> None:
    backend = await make_backend(fake, keep_history=True)  # to read how the prompt ended
    prompt_id = await cancelled_while_running(fake, backend)

    assert [(i.prompt_id, i.running) for i in fake.interrupts] == [(prompt_id, prompt_id)]
    await fake.wait_until(lambda: fake.history_entry(prompt_id) is not None)
    entry = fake.history_entry(prompt_id)
    assert entry is not None and entry["status"]["messages"][-1][0] == "execution_interrupted"


async def test_an_interrupted_prompt_is_forgotten_after_the_cancel_unless_history_is_kept(
    fake: FakeComfyUI, make_backend: BackendFactory
) -> None:
    prompt_id = await cancelled_while_running(fake, await make_backend(fake))

    await fake.wait_until(lambda: {"delete": [prompt_id]} in [c.body for c in fake.calls("POST", "/history")])
    await fake.wait_until(lambda: fake.history_entry(prompt_id) is None)


async def test_cancelling_a_pending_prompt_deletes_it_and_returns_at_once(
    fake: FakeComfyUI, make_backend: BackendFactory
) -> None:
    backend = await make_backend(fake)
    fake.pause()
    job = asyncio.create_task(backend.generate(make_request(), RecordingContext()))
    await fake.wait_until(lambda: len(fake.pending_prompts) == 1)
    prompt_id = fake.pending_prompts[0]
    loop = asyncio.get_running_loop()

    started = loop.time()
    job.cancel()
    with pytest.raises(asyncio.CancelledError):
        await job

    assert loop.time() - started < 0.5  # no waiting for an event that never comes
    assert [r.body for r in fake.calls("POST", "/queue")] == [{"delete": [prompt_id]}]
    assert fake.pending_prompts == []
    assert fake.interrupts == []


async def test_a_worker_letting_go_leaves_the_prompt_running_for_the_next_owner(
    fake: FakeComfyUI, make_backend: BackendFactory
) -> None:
    backend = await make_backend(fake)
    ctx = RecordingContext(cancel_requested=False)  # shutdown or lost lease, not the owner
    job = asyncio.create_task(backend.generate(make_request("slow [fake:duration=1]", steps=10), ctx))
    prompt_id = await fake.wait_running()

    job.cancel()
    with pytest.raises(asyncio.CancelledError):
        await job

    assert fake.interrupts == [] and fake.calls("POST", "/queue") == []
    await fake.wait_until(lambda: fake.history_entry(prompt_id) is not None)
    entry = fake.history_entry(prompt_id)
    assert entry is not None and entry["status"]["status_str"] == "success"


async def test_the_slot_of_an_interrupted_prompt_frees_once_comfyui_stopped(
    fake: FakeComfyUI, make_backend: BackendFactory
) -> None:
    backend = await make_backend(fake, lookahead=0)
    job = asyncio.create_task(
        backend.generate(make_request("slow [fake:duration=5]", steps=50), RecordingContext())
    )
    await fake.wait_running()
    job.cancel()
    with pytest.raises(asyncio.CancelledError):
        await job

    result = await asyncio.wait_for(backend.generate(make_request(), RecordingContext()), 5)

    assert result.image.read()
    assert len(fake.executions) == 2
    assert fake.executions[0].outcome == "interrupted"
    assert fake.executions[0].end is not None
    assert fake.executions[1].start >= fake.executions[0].end  # never two of ours at once with lookahead 0


async def test_a_prompt_over_its_deadline_is_interrupted_and_retried(
    fake: FakeComfyUI, make_backend: BackendFactory
) -> None:
    backend = await make_backend(fake, timeout=0.3)

    with pytest.raises(RetryableError) as caught:
        await backend.generate(make_request("slow [fake:duration=5]", steps=50), RecordingContext())

    prompt_id = fake.calls("POST", "/prompt")[0].body["prompt_id"]
    assert caught.value.message == (
        f"ComfyUI did not finish within 0.3 s of starting (prompt {prompt_id} on {fake.url}); "
        "it was interrupted"
    )
    assert [i.prompt_id for i in fake.interrupts] == [prompt_id]
    assert fake.executions[0].outcome == "interrupted"


async def test_a_prompt_that_ignores_the_interrupt_is_reported_as_stuck(
    fake: FakeComfyUI, make_backend: BackendFactory
) -> None:
    graph = {
        "1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0}},
        "2": {"class_type": "ImageBlur", "inputs": {"image": ["1", 0], "blur_radius": 3, "sigma": 1.0}},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "x"}},
    }
    fake.default_duration = 3.0  # one long node without progress ticks: the interrupt waits for it
    backend = await make_backend(fake, timeout=0.2, interrupt_grace=0.3)

    with pytest.raises(RetryableError) as caught:
        await backend.generate(make_request(workflow={"graph": graph}), RecordingContext())

    assert caught.value.message.endswith(
        "it was interrupted but did not stop within 0.3 s; the instance may need a restart"
    )


@pytest.mark.parametrize("comfyui", ["waiting", "free"])
async def test_a_cancel_during_a_slow_post_still_stops_the_prompt_once_it_lands(
    fake: FakeComfyUI, make_backend: BackendFactory, comfyui: str
) -> None:
    backend = await make_backend(fake)
    fake.post_delay = 0.5  # the prompt is queued only when the POST returns
    if comfyui == "waiting":
        fake.pause()
    job = asyncio.create_task(
        backend.generate(make_request("slow [fake:duration=5]", steps=50), RecordingContext())
    )
    await fake.wait_until(lambda: len(fake.calls("POST", "/prompt")) == 1)
    prompt_id = fake.calls("POST", "/prompt")[0].body["prompt_id"]

    job.cancel()  # before the prompt exists in ComfyUI
    with pytest.raises(asyncio.CancelledError):
        await job

    if comfyui == "waiting":
        assert [r.body for r in fake.calls("POST", "/queue")] == [{"delete": [prompt_id]}]
        assert fake.executions == []
    else:
        assert [i.prompt_id for i in fake.interrupts] == [prompt_id]
        await fake.wait_until(lambda: fake.history_entry(prompt_id) is not None)
        assert fake.executions[0].outcome == "interrupted"
    assert fake.pending_prompts == [] and fake.running_prompt is None


async def test_without_the_jobs_api_the_cancel_probes_once_then_deletes_and_interrupts(
    fake: FakeComfyUI, make_backend: BackendFactory
) -> None:
    backend = await make_backend(fake)
    for _ in range(2):
        job = asyncio.create_task(
            backend.generate(make_request("slow [fake:duration=5]", steps=50), RecordingContext())
        )
        await fake.wait_running()
        job.cancel()
        with pytest.raises(asyncio.CancelledError):
            await job
        await fake.wait_until(lambda: fake.running_prompt is None)

    probes = fake.calls("POST", "/jobs/")
    assert len(probes) == 1  # 0.3.64 answers 405; asked once per connection
    assert len(fake.interrupts) == 2 and fake.job_cancels == []


@pytest.mark.parametrize("comfyui", ["waiting", "running"])
async def test_the_jobs_api_cancel_is_used_where_the_server_has_it(
    newer_fake: FakeComfyUI, make_backend: BackendFactory, comfyui: str
) -> None:
    backend = await make_backend(newer_fake)
    if comfyui == "waiting":
        newer_fake.pause()
    job = asyncio.create_task(
        backend.generate(make_request("slow [fake:duration=5]", steps=50), RecordingContext())
    )
    await newer_fake.wait_until(lambda: len(newer_fake.calls("POST", "/prompt")) == 1)
    prompt_id = newer_fake.calls("POST", "/prompt")[0].body["prompt_id"]
    if comfyui == "running":
        await newer_fake.wait_running()

    job.cancel()
    with pytest.raises(asyncio.CancelledError):
        await job

    outcome = "dequeued" if comfyui == "waiting" else "interrupted"
    assert [(c.prompt_id, c.outcome) for c in newer_fake.job_cancels] == [(prompt_id, outcome)]
    assert newer_fake.interrupts == [] and newer_fake.calls("POST", "/queue") == []
    assert newer_fake.pending_prompts == []
