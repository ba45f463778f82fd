"""Someone else's prompts on a shared ComfyUI, and the two budgets: waiting, then running."""

from __future__ import annotations

import asyncio

import pytest

from imagen_worker.errors import BackendUnavailable
from tests.backends.comfyui.conftest import BackendFactory
from tests.backends.comfyui.support import RecordingContext, make_request
from tests.backends.comfyui.test_comfyui_outages import Wakeups, until
from tests.fakes.comfyui import FakeComfyUI


async def test_an_instance_busy_with_foreign_prompts_counts_nothing_until_it_frees_up(
    fake: FakeComfyUI, make_backend: BackendFactory
) -> None:
    backend = await make_backend(fake)
    wakeups = Wakeups(backend)

    foreign = await fake.submit_foreign(duration=0.8)
    await until(lambda: backend.capacity == 0)

    assert fake.running_prompt == foreign or foreign in fake.pending_prompts
    assert backend.unavailable_reason is None  # busy, not broken: the backlog waits in the database
    assert wakeups.count == 1
    await until(lambda: backend.capacity == 3)
    assert fake.history_entry(foreign) is not None
    assert wakeups.count == 2


async def test_a_broadcast_of_an_empty_queue_frees_the_instance_without_reading_the_queue(
    fake: FakeComfyUI, make_backend: BackendFactory
) -> None:
    backend = await make_backend(fake)
    foreign = await fake.submit_foreign(duration=0.3)
    await until(lambda: backend.capacity == 0)
    assert fake.calls("GET", "/queue"), "busy: the queue is read to see whose prompts are there"

    await until(lambda: backend.capacity == 3)
    await asyncio.sleep(0.1)  # time for a /queue read, were one made

    # The prompt's end broadcasts queue_remaining 0: nothing to read, so a job claimed right
    # then does not wait for a round trip to learn the instance is free.
    ended = next(run.end for run in fake.executions if run.prompt_id == foreign)
    assert ended is not None
    assert [call for call in fake.calls("GET", "/queue") if call.at >= ended] == []


async def test_the_deadline_does_not_count_waiting_behind_foreign_work(
    fake: FakeComfyUI, make_backend: BackendFactory
) -> None:
    backend = await make_backend(fake, timeout=0.5)
    foreign = await fake.submit_foreign(duration=1.2)  # longer than our whole timeout
    await fake.wait_running()

    result = await asyncio.wait_for(backend.generate(make_request(), RecordingContext()), 5)

    ours = next(run for run in fake.executions if run.prompt_id == result.metadata["prompt_id"])
    theirs = next(run for run in fake.executions if run.prompt_id == foreign)
    assert theirs.end is not None and ours.start >= theirs.end
    assert fake.interrupts == [] and theirs.outcome == "success"


async def test_the_deadline_does_not_count_waiting_behind_our_own_prompt(
    fake: FakeComfyUI, make_backend: BackendFactory
) -> None:
    fake.default_duration = 0.4
    backend = await make_backend(fake, timeout=0.6, lookahead=1)

    results = await asyncio.gather(*(backend.generate(make_request(), RecordingContext()) for _ in range(2)))

    # The second waited about 0.4 s in ComfyUI's queue and ran 0.4 s: 0.8 s from submission.
    first, second = sorted(fake.executions, key=lambda run: run.start)
    assert first.end is not None and second.start >= first.end
    assert [run.outcome for run in (first, second)] == ["success", "success"]
    assert len(results) == 2 and fake.interrupts == []


async def test_past_the_queue_budget_the_prompt_is_taken_back_and_the_job_is_not_blamed(
    fake: FakeComfyUI, make_backend: BackendFactory
) -> None:
    backend = await make_backend(fake, queue_timeout=0.4)
    fake.pause()  # ComfyUI never gets to our prompt

    with pytest.raises(BackendUnavailable) as caught:
        await asyncio.wait_for(backend.generate(make_request(), RecordingContext()), 5)

    prompt_id = fake.calls("POST", "/prompt")[0].body["prompt_id"]
    assert caught.value.message == (
        "ComfyUI did not start the job within 0.4 s (busy with other work); the job goes back to the queue"
    )
    assert [r.body for r in fake.calls("POST", "/queue")] == [{"delete": [prompt_id]}]
    assert fake.pending_prompts == [] and fake.executions == []


async def test_a_job_claimed_while_every_instance_is_busy_with_others_waits_then_gives_back(
    fake: FakeComfyUI, make_backend: BackendFactory
) -> None:
    backend = await make_backend(fake, queue_timeout=0.4)
    await fake.submit_foreign(duration=3)
    await until(lambda: backend.capacity == 0)

    with pytest.raises(BackendUnavailable) as caught:
        await asyncio.wait_for(backend.generate(make_request(), RecordingContext()), 5)

    assert caught.value.message == (
        "no ComfyUI instance was free within 0.4 s (busy with other work); the job goes back to the queue"
    )
    assert [r.body.get("client_id") for r in fake.calls("POST", "/prompt")] == ["comfyui-frontend"]


async def test_two_backends_of_one_worker_on_the_same_comfyui_share_it_instead_of_blocking(
    fake: FakeComfyUI, make_backend: BackendFactory
) -> None:
    sd15 = await make_backend(fake)
    sdxl = await make_backend(fake, workflow="sdxl")
    fake.pause()
    job = asyncio.create_task(sd15.generate(make_request(), RecordingContext()))
    await fake.wait_until(lambda: len(fake.pending_prompts) == 1)
    await fake.submit_foreign(duration=0.01)  # a real stranger, for contrast
    await until(lambda: sdxl.capacity == 0)
    fake.resume()

    await asyncio.wait_for(job, 5)
    await until(lambda: sdxl.capacity == 3)
    job = asyncio.create_task(sd15.generate(make_request("[fake:duration=0.5]"), RecordingContext()))
    await fake.wait_running()
    await asyncio.sleep(0.2)  # time for the queue changes to reach sdxl

    assert sdxl.capacity == 3  # the other backend's prompt is this worker's own work
    await asyncio.wait_for(job, 5)


async def test_an_instance_running_only_our_prompts_is_never_asked_for_its_queue(
    fake: FakeComfyUI, make_backend: BackendFactory
) -> None:
    # Every broadcast during our jobs counts no more prompts than we have there; /queue answers
    # with each queued prompt's whole graph, so reading it for nothing is not free.
    backend = await make_backend(fake)

    await asyncio.gather(*(backend.generate(make_request(), RecordingContext()) for _ in range(3)))

    assert fake.calls("POST", "/prompt")
    assert fake.calls("GET", "/queue") == []
