"""ComfyUI's traps: history race, dead or silent sockets, restarts, cached reruns."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from imagen_worker.backends.comfyui.config import parse_config
from imagen_worker.errors import BackendUnavailable
from tests.backends.comfyui.conftest import BackendFactory
from tests.backends.comfyui.support import RecordingContext, make_request
from tests.backends.comfyui.test_comfyui_outages import until
from tests.fakes.comfyui import FakeComfyUI


async def test_history_written_late_after_success_is_still_read_correctly(
    fake: FakeComfyUI, make_backend: BackendFactory
) -> None:
    fake.history_delay = 0.3  # execution_success is out, GET /history still answers {}
    backend = await make_backend(fake)

    result = await backend.generate(make_request(), RecordingContext())
    returned = asyncio.get_running_loop().time()

    assert result.image.read().startswith(b"\x89PNG")
    assert fake.executions[0].end is not None
    assert returned >= fake.executions[0].end + 0.3  # it waited for the history write, not for nothing
    prompt_id = result.metadata["prompt_id"]
    await until(lambda: fake.history_entry(prompt_id) is None)  # read once written, then deleted
    assert [call.body for call in fake.calls("POST", "/history")] == [{"delete": [prompt_id]}]


@pytest.mark.parametrize("trouble", ["socket dropped for good", "socket silent"])
async def test_the_history_poll_finishes_a_job_whose_socket_failed(
    fake: FakeComfyUI, make_backend: BackendFactory, trouble: str
) -> None:
    backend = await make_backend(fake, poll_interval=0.1)
    job = asyncio.create_task(backend.generate(make_request("[fake:duration=0.3]"), RecordingContext()))
    await fake.wait_running()
    if trouble == "socket dropped for good":
        fake.refuse_websockets = True
        await fake.drop_sockets()
    else:
        fake.mute_events = True

    result = await asyncio.wait_for(job, 5)

    assert result.image.read().startswith(b"\x89PNG")
    assert len(fake.calls("GET", "/history/")) >= 2


async def test_a_restart_that_forgets_the_prompt_is_an_outage_and_the_retry_resubmits(
    fake: FakeComfyUI, make_backend: BackendFactory
) -> None:
    backend = await make_backend(fake)
    ctx = RecordingContext()
    request = make_request("[fake:duration=5]", steps=20)
    job = asyncio.create_task(backend.generate(request, ctx))
    first = await fake.wait_running()

    await fake.restart()
    with pytest.raises(BackendUnavailable) as caught:  # gone, or not reachable for a moment: either way
        await asyncio.wait_for(job, 5)

    assert caught.value.detail["instance"] == fake.url
    # The worker retries once the backend is available again (it claims nothing before).
    await until(lambda: backend.unavailable_reason is None)
    retry = RecordingContext(first_claim=False)
    result = await asyncio.wait_for(backend.generate(make_request(job_id=request.job_id), retry), 5)
    assert result.metadata["prompt_id"] != first
    assert retry.refs and retry.refs[0].startswith(result.metadata["prompt_id"])
    assert backend._instances[0].client.connected


async def test_the_fake_reproduces_the_cache_trap_and_the_adapter_avoids_it(
    fake: FakeComfyUI, make_backend: BackendFactory
) -> None:
    graph = {
        "1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 255}},
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "shared"}},
    }
    async with httpx.AsyncClient(base_url=fake.url) as http:
        for _ in range(2):
            await http.post("/prompt", json={"prompt": graph})
            await fake.wait_until(lambda: fake.running_prompt is None and not fake.pending_prompts)
        outputs = [entry["outputs"]["2"]["images"][0]["filename"] for entry in fake._state.history.values()]
    assert outputs == ["shared_00001_.png", "shared_00001_.png"]  # the identical rerun got the OLD file

    backend = await make_backend(fake)
    first = await backend.generate(make_request(), RecordingContext())
    second = await backend.generate(make_request(), RecordingContext())  # same params, another job

    assert first.metadata["outputs"][0]["subfolder"] != second.metadata["outputs"][0]["subfolder"]
    assert second.metadata["cached_nodes"]  # the model and text nodes were cached...
    assert "9" not in second.metadata["cached_nodes"]  # ...but the saver ran again for this job
    assert len([key for key in fake.files if key[0] == "output"]) == 3


async def test_a_reconnected_socket_carries_the_job_to_its_end(
    fake: FakeComfyUI, make_backend: BackendFactory
) -> None:
    backend = await make_backend(fake, poll_interval=30)  # the poll cannot be what finishes it
    job = asyncio.create_task(
        backend.generate(make_request("[fake:duration=0.4]", steps=8), RecordingContext())
    )
    await fake.wait_running()
    await fake.broadcast("crystools.monitor", {"cpu_utilization": 3.5})  # unknown types are ignored

    await fake.drop_sockets()  # the client reconnects with the same clientId; nothing is replayed
    result = await asyncio.wait_for(job, 5)

    sockets = fake.calls("GET", "/ws")
    assert len(sockets) == 2 and sockets[0].query == sockets[1].query
    assert result.metadata["outputs"][0]["node_type"] == "SaveImage"


async def test_a_prompt_removed_from_comfyuis_queue_by_someone_else_is_resubmitted_without_blame(
    fake: FakeComfyUI, make_backend: BackendFactory
) -> None:
    backend = await make_backend(fake, poll_interval=0.1)
    fake.pause()
    job = asyncio.create_task(backend.generate(make_request(), RecordingContext()))
    await fake.wait_until(lambda: len(fake.pending_prompts) == 1)
    prompt_id = fake.pending_prompts[0]

    async with httpx.AsyncClient(base_url=fake.url) as http:  # the ComfyUI UI's "delete" button
        await http.post("/queue", json={"delete": [prompt_id]})
    with pytest.raises(BackendUnavailable) as caught:
        await asyncio.wait_for(job, 5)

    assert caught.value.message == (
        f"ComfyUI no longer knows prompt {prompt_id} (it restarted, or the prompt was removed from its "
        "queue); the job will be submitted again"
    )


async def test_a_socket_that_stays_open_but_goes_silent_is_dropped_within_seconds(
    fake: FakeComfyUI, make_backend: BackendFactory
) -> None:
    # The poll is 30 s away: only the ping can notice that the socket went silent.
    backend = await make_backend(fake, poll_interval=30, ping_interval=0.5, ping_timeout=0.5)
    loop = asyncio.get_running_loop()
    job = asyncio.create_task(backend.generate(make_request("[fake:duration=1.0]"), RecordingContext()))
    await fake.wait_running()
    fake.stall_sockets()  # no events, no pongs, the TCP connection stays up
    stalled_at = loop.time()

    result = await asyncio.wait_for(job, 10)

    assert loop.time() - stalled_at < 3.0, "noticed by the ping, reconnected, then the poll found it"
    assert fake.socket_connects == 2
    assert result.metadata["outputs"][0]["node_type"] == "SaveImage"


def test_pings_default_to_every_five_seconds_with_a_five_second_timeout() -> None:
    config = parse_config("gpu", {"type": "comfyui", "base_url": "http://127.0.0.1:8188", "workflow": "sd15"})
    assert (config.ping_interval, config.ping_timeout) == (5.0, 5.0)
